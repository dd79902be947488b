"""How the lifecycle hands work on: through Celery in a worker, inline in tests and tools."""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from orchestrator.lifecycle.context import Lifecycle


class Dispatcher(Protocol):
    def admit_waiting(self) -> None:
        """Run an admission pass soon (a slot freed, or requests wait)."""

    def start_admitted(self, session_id: uuid.UUID, claim_id: str) -> None:
        """Run the vendor start of a row that admission moved to ``starting``."""

    def publish_events(self) -> None:
        """Relay the outbox's unpublished lifecycle events to the broker."""


class InlineDispatcher:
    """Does the work in the calling thread; re-entrant calls are folded into one more pass."""

    def __init__(self) -> None:
        self.lifecycle: Lifecycle | None = None
        self._local = threading.local()

    def admit_waiting(self) -> None:
        from orchestrator.lifecycle.admission import admit_waiting

        if getattr(self._local, "running", False):
            self._local.again = True
            return
        assert self.lifecycle is not None
        self._local.running = True
        try:
            self._local.again = True
            while self._local.again:
                self._local.again = False
                admit_waiting(self.lifecycle)
        finally:
            self._local.running = False

    def start_admitted(self, session_id: uuid.UUID, claim_id: str) -> None:
        from orchestrator.lifecycle.start import run_start

        assert self.lifecycle is not None
        run_start(self.lifecycle, session_id, claim_id)

    def publish_events(self) -> None:
        """No broker here: events stay in the outbox for a worker's relay to publish."""
