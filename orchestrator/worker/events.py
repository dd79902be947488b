"""Celery's worker events (a heartbeat every 2 s from the worker's timer thread; task events
from its consumer when ``--task-events`` is on), each publish bounded.

Celery publishes them with publisher confirms and no timeout: under a memory or disk alarm the
first heartbeat blocks the timer thread for as long as the alarm lasts, and everything else
on that thread with it (a held ETA task never runs). Here an event waits for its confirm at
most ``EVENT_CONFIRM_SECONDS``; one not confirmed by then is dropped (events feed monitors,
best effort), its connection discarded so that a late confirm is never taken for another's.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher

from orchestrator.publishing import discard_connection, retryable_publish_errors

logger = logging.getLogger(__name__)
EVENT_CONFIRM_SECONDS = 1.0


class BoundedEventDispatcher(EventDispatcher):
    def _publish(  # noqa: PLR0917 - Celery's own signature
        self,
        event: Any,
        producer: Any,
        routing_key: str,
        retry: bool = False,
        retry_policy: Any = None,
        utcoffset: Any = None,
    ) -> None:
        if producer is None:
            return
        own: Any = self  # Celery's stubs leave these attributes out
        try:
            producer.publish(
                event,
                routing_key=routing_key,
                exchange=own.exchange.name,
                declare=[own.exchange],
                serializer=own.serializer,
                headers=own.headers,
                delivery_mode=own.delivery_mode,
                confirm_timeout=EVENT_CONFIRM_SECONDS,
                timeout=EVENT_CONFIRM_SECONDS,
            )
        except retryable_publish_errors() as error:
            discard_connection(producer)
            logger.debug("worker event %s dropped: %s", routing_key, type(error).__name__)


class BoundedEvents(Events):
    dispatcher_cls = "orchestrator.worker.events:BoundedEventDispatcher"
