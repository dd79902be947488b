"""How the lifecycle hands work on: through Celery in a worker (orchestrator.worker.dispatcher),
inline in tests and tools (orchestrator.lifecycle.inline)."""

from __future__ import annotations

import uuid
from typing import Protocol


class Dispatcher(Protocol):
    def admit_waiting(self) -> None:
        """Run an admission pass soon (a slot freed, or requests wait)."""

    def start_admitted(self, session_id: uuid.UUID, claim_id: str) -> None:
        """Run the vendor start of a row that admission moved to ``starting``."""

    def publish_events(self) -> None:
        """Relay the outbox's unpublished lifecycle events to the broker."""
