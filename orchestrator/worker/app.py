"""The worker's Celery application: the settings attached, and one lifecycle per process
built on first use (after a fork, the child builds its own)."""

from __future__ import annotations

import threading

from orchestrator import retries
from orchestrator.celery_publishing import PublishingCelery
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.lifecycle import Lifecycle, metrics
from orchestrator.publishing import broker_url
from orchestrator.worker.dispatcher import CeleryDispatcher


class OrchestratorCelery(PublishingCelery):
    def __init__(self, settings: Settings) -> None:
        super().__init__(
            "orchestrator",
            broker=broker_url(settings),
            set_as_current=False,
            events="orchestrator.worker.events:BoundedEvents",  # each event publish bounded
        )
        self.settings = settings
        self.publish_timeout = settings.publish_timeout_seconds
        self.publish_backoff = retries.publish_after_nack(settings)
        self._lifecycle: Lifecycle | None = None
        self._lifecycle_lock = threading.Lock()
        self.dispatcher = CeleryDispatcher(self, self._database)

    def lifecycle(self) -> Lifecycle:
        with self._lifecycle_lock:
            if self._lifecycle is None:
                self._lifecycle = Lifecycle.from_settings(self.settings, self.dispatcher)
                metrics.register_gauges(self._lifecycle.db)
            return self._lifecycle

    def _database(self) -> Database:
        return self.lifecycle().db

    def forget_lifecycle(self) -> None:
        """After a fork: the parent's connections must not be shared with the child."""
        with self._lifecycle_lock:
            self._lifecycle = None
