"""Publishing relayed events to ``orchestrator.events``: persistent, with publisher confirms
(each publish returns once the broker confirmed it), traced in the session's trace. Every
message is bounded by the publish timeout (ORCHESTRATOR_PUBLISH_TIMEOUT_SECONDS, the batch
as a whole): past it :class:`~orchestrator.publishing.PublishError`, and the relay leaves the
rows for a later pass. Not ``mandatory``: an event nobody listens to is routed nowhere, and
that is no failure."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from orchestrator import retries, tracing
from orchestrator.events.relay import PendingEvent
from orchestrator.messaging import events_exchange
from orchestrator.publishing import (
    DEFAULT_PUBLISH_TIMEOUT_SECONDS,
    PublishError,
    discard_connection,
    publish_within,
    retryable_publish_errors,
)


def publish_batch(
    producer_pool: Any,
    batch: Sequence[PendingEvent],
    timeout: float = DEFAULT_PUBLISH_TIMEOUT_SECONDS,
    backoff: retries.Backoff | None = None,
) -> None:
    """Publish ``batch`` through a kombu producer pool; raises (:class:`PublishError`) unless
    every message was confirmed within ``timeout`` seconds (a refused one published again
    after ``backoff``: ``ORCHESTRATOR_PUBLISH_BACKOFF_*``)."""
    deadline = time.monotonic() + timeout
    for event in batch:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PublishError(f"event batch not confirmed within {timeout:g} s")
        with tracing.session_span(
            "session.event.publish",
            event.traceparent,
            request_id=event.body.get("request_id"),
            event=event.routing_key,
            event_id=str(event.event_id),
        ):

            def attempt(remaining: float, event: PendingEvent = event) -> None:
                _publish_one(producer_pool, event, remaining)

            publish_within(left, attempt, f"event {event.routing_key}", backoff)


def _publish_one(producer_pool: Any, event: PendingEvent, remaining: float) -> None:
    with producer_pool.acquire(block=True, timeout=remaining) as producer:
        try:
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
                confirm_timeout=remaining,
                timeout=remaining,
            )
        except retryable_publish_errors():
            discard_connection(producer)
            raise
