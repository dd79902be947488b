"""A producer without database access gets a session's credentials from the broker alone: the
lifecycle events of `orchestrator.events`, read with plain kombu as docs/messages.md tells any
AMQP client to, and with `orchestrator.producer.SessionEvents`. The producer's settings here
name a database that does not exist, so nothing below can have read one."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kombu import Connection, Exchange, Queue
from sqlalchemy.exc import OperationalError

from orchestrator.cli import EXIT_SESSION_FAILED, main
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.producer import Producer, SessionEvents
from orchestrator.simulator import SimulatorServer
from tests.amqp import publish_raw
from tests.conftest import WorkerProcess, settings_env, wait_until
from tests.helpers import row

pytestmark = [pytest.mark.broker, pytest.mark.worker, pytest.mark.postgres]
NO_DATABASE = "postgresql+psycopg://nobody:wrong@127.0.0.1:1/none"


@pytest.fixture
def worker_and_producer_settings(
    settings_for: Callable[..., Settings],
    broker_url: str,
    db: Database,
    simulator: SimulatorServer,
    purge_queues: Callable[[], None],
    tmp_path: Path,
) -> Iterator[Settings]:
    """A worker with the database; returns the producer's settings, which have none."""
    purge_queues()
    worker = WorkerProcess(
        settings_for(broker_url=broker_url, orphan_grace_seconds=5.0), tmp_path / "worker.log"
    )
    try:
        yield settings_for(broker_url=broker_url, database_url=NO_DATABASE)
    finally:
        worker.stop()


def wait_for_event_with_plain_kombu(
    broker_url: str, request_id: str, publish: Callable[[], None], timeout: float = 20
) -> dict[str, Any]:
    """The recipe of docs/messages.md: a queue of one's own bound to `session.#` on the
    `orchestrator.events` topic exchange, declared before the start is published; the first
    event whose `request_id` is ours."""
    found: list[dict[str, Any]] = []
    exchange = Exchange("orchestrator.events", type="topic", durable=True)
    queue = Queue(
        f"my-app.events.{uuid.uuid4().hex[:8]}",
        exchange,
        routing_key="session.#",
        durable=False,
        auto_delete=True,
    )

    def on_event(body: Any, message: Any) -> None:
        if body.get("request_id") == request_id:
            found.append(body)
        message.ack()

    with (
        Connection(broker_url) as conn,
        conn.Consumer(queue, callbacks=[on_event], accept=["json"]),
    ):
        publish()
        wait_until(lambda: conn.drain_events(timeout=timeout) or found, timeout=timeout)
    return found[0]


def test_plain_kombu_consumer_gets_the_credentials(
    worker_and_producer_settings: Settings, broker_url: str, db: Database
) -> None:
    body = wait_for_event_with_plain_kombu(
        broker_url,
        "broker-only-1",
        lambda: publish_raw(broker_url, {"request_id": "broker-only-1", "avatar_id": "a"}),
    )
    assert body["status"] == "active"
    stored = row(db, "broker-only-1")
    assert (body["url"], body["room_name"], body["token"]) == (
        stored.livekit_url,
        stored.livekit_room,
        stored.livekit_token,
    )


def test_session_events_wait_without_a_database(
    worker_and_producer_settings: Settings, db: Database
) -> None:
    settings = worker_and_producer_settings
    producer = Producer(settings)
    try:
        with SessionEvents(settings) as events:
            good = producer.enqueue_start_session(avatar_id="a", max_session_duration=5)
            bad = producer.enqueue_start_session(avatar_id="a", request_id="broker-only-bad")
            info = events.wait(good, timeout=20)
            assert info.status == "active"
            assert info.livekit_token == row(db, good).livekit_token
            assert info.livekit_url and info.livekit_room and info.expires_at
            # The event came before this wait: it was kept.
            wait_until(lambda: row(db, bad).status == "active", timeout=20)
            assert events.wait(bad, timeout=1).status == "active"
            producer.request_stop(request_id=bad)
            wait_until(lambda: events.wait(bad, timeout=20).status == "ended", timeout=20)
            assert events.wait(bad, timeout=1).end_reason == "USER_CLOSED"
            with pytest.raises(TimeoutError, match="no event for request never-sent"):
                events.wait("never-sent", timeout=0.5)
    finally:
        producer.close()
    with pytest.raises(OperationalError, match=r"port 1 failed"):
        Producer(settings).session_info(good)  # the database really is out of reach


def test_enqueue_wait_via_events_prints_the_outcome_and_exits_3_on_failure(
    worker_and_producer_settings: Settings, simulator: SimulatorServer
) -> None:
    env = settings_env(worker_and_producer_settings)
    ok = CliRunner().invoke(
        main,
        ["enqueue", "--avatar-id", "a", "--wait", "20", "--wait-via", "events"],
        env=env,
    )
    assert ok.exit_code == 0, ok.output
    request_id, rest = ok.output.split("\n", 1)
    info = json.loads(rest)
    assert info["request_id"] == request_id and info["status"] == "active"
    assert info["livekit_token"] and info["expires_at"].endswith("Z")

    # The vendor refuses the start for good (out of credits): the request fails, exit 3.
    simulator.push_fault({"endpoint": "start", "status": 402, "code": 4020})
    failed = CliRunner().invoke(
        main,
        ["enqueue", "--avatar-id", "a", "--wait", "20", "--wait-via", "events"],
        env=env,
    )
    assert failed.exit_code == EXIT_SESSION_FAILED, failed.output
    outcome = json.loads(failed.output.split("\n", 1)[1])
    assert (outcome["status"], outcome["error_code"]) == ("failed", "VENDOR_4020")
