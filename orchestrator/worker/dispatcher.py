"""How a worker's lifecycle hands work on: admission passes and admitted starts as messages,
lifecycle events to this process's relay thread."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

from orchestrator.celery_publishing import PublishingCelery
from orchestrator.db import Database
from orchestrator.events.publisher import publish_batch
from orchestrator.events.relay import PendingEvent, RelayThread
from orchestrator.messaging import ADMIT_TASK, START_ADMITTED_TASK


class CeleryDispatcher:
    """Admission work to the control queue, admitted starts to the start queue, events to the
    relay thread (batched, off the task's thread)."""

    def __init__(self, app: PublishingCelery, database: Callable[[], Database]) -> None:
        self.app = app
        self.relay = RelayThread(database, self._publish)

    def admit_waiting(self) -> None:
        self.app.send_task(ADMIT_TASK)

    def start_admitted(self, session_id: uuid.UUID, claim_id: str) -> None:
        self.app.send_task(
            START_ADMITTED_TASK, kwargs={"session_id": str(session_id), "claim_id": claim_id}
        )

    def publish_events(self) -> None:
        self.relay.wake()

    def _publish(self, batch: Sequence[PendingEvent]) -> None:
        app = self.app
        publish_batch(app.producer_pool, batch, app.publish_timeout, app.publish_backoff)
