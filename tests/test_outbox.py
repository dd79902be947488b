"""Lifecycle events survive a broker outage: they wait in the outbox and go out once it is back."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest
from kombu import Connection, Queue
from sqlalchemy import func, select

from orchestrator.config import Settings
from orchestrator.db import Database, OutboxEvent
from orchestrator.lifecycle import Lifecycle, handle_start_message, request_stop
from orchestrator.messaging import events_exchange
from orchestrator.simulator import SimulatorServer
from orchestrator.worker.celery_app import create_app

pytestmark = [pytest.mark.postgres, pytest.mark.broker]


def unpublished(db: Database) -> int:
    with db.transaction() as session:
        return session.scalar(select(func.count()).where(OutboxEvent.published_at.is_(None))) or 0


def test_events_wait_out_a_broker_outage_then_are_published_once_in_order(
    settings_for: Callable[..., Settings],
    broker_url: str,
    lifecycle: Lifecycle,
    simulator: SimulatorServer,
) -> None:
    handle_start_message(lifecycle, (), {"avatar_id": "a", "request_id": "ob-1"}, claim_id="ob-1")
    request_stop(lifecycle, request_id="ob-1")
    assert unpublished(lifecycle.db) == 2

    # Nothing listens on port 1: every publish fails, and the rows stay for later.
    down = create_app(settings_for(broker_url="amqp://guest:guest@127.0.0.1:1//"))
    try:
        down.dispatcher.relay.relay_now()
    finally:
        down.close()
    assert unpublished(lifecycle.db) == 2

    consumer_queue = Queue(
        f"test-outbox-{uuid.uuid4().hex[:6]}", exchange=events_exchange, routing_key="#"
    )
    up = create_app(settings_for(broker_url=broker_url))
    with Connection(broker_url) as conn:
        consumer_queue(conn.default_channel).declare()
        try:
            up.dispatcher.relay.relay_now()
            up.dispatcher.relay.relay_now()  # nothing left: a second pass sends nothing again
            received = []
            while (message := consumer_queue(conn.default_channel).get(no_ack=True)) is not None:
                received.append(message)
        finally:
            consumer_queue(conn.default_channel).delete()
            up.close()
    bodies = [json.loads(m.body) for m in received]
    assert [(b["request_id"], b["status"]) for b in bodies] == [
        ("ob-1", "active"),
        ("ob-1", "ended"),
    ]
    assert [m.properties["message_id"] for m in received] == [b["event_id"] for b in bodies]
    assert all(m.properties["delivery_mode"] == 2 for m in received)
    assert unpublished(lifecycle.db) == 0
