"""Publishing relayed events to ``orchestrator.events``: persistent, with publisher confirms
(each publish returns once the broker confirmed it), traced in the session's trace."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestrator.events.relay import PendingEvent
from orchestrator.lifecycle import tracing
from orchestrator.messaging import events_exchange

PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}


def publish_batch(producer_pool: Any, batch: Sequence[PendingEvent]) -> None:
    """Publish ``batch`` through a kombu producer pool; raises unless every message was
    confirmed (the relay then leaves the rows for its next pass)."""
    with producer_pool.acquire(block=True, timeout=10) as producer:
        for event in batch:
            with tracing.session_span(
                "session.event.publish",
                event.traceparent,
                request_id=event.body.get("request_id"),
                event=event.routing_key,
                event_id=str(event.event_id),
            ):
                headers = {"traceparent": event.traceparent} if event.traceparent else {}
                producer.publish(
                    event.body,
                    exchange=events_exchange,
                    routing_key=event.routing_key,
                    serializer="json",
                    delivery_mode=2,
                    message_id=str(event.event_id),
                    headers=headers,
                    declare=[events_exchange],
                    retry=True,
                    retry_policy=PUBLISH_RETRY_POLICY,
                )
