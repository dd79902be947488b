"""Handing work on inline, in the calling thread: for tests, tools and one-off scripts that
run the lifecycle without a broker."""

from __future__ import annotations

import threading
import uuid

from orchestrator.config import Settings
from orchestrator.lifecycle.admission import admit_waiting
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.lifecycle.start import run_start


class InlineDispatcher:
    """Does the work in the calling thread; re-entrant calls are folded into one more pass."""

    def __init__(self) -> None:
        self.lifecycle: Lifecycle | None = None
        self._local = threading.local()

    def admit_waiting(self) -> None:
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
        assert self.lifecycle is not None
        run_start(self.lifecycle, session_id, claim_id)

    def publish_events(self) -> None:
        """No broker here: events stay in the outbox for a worker's relay to publish."""


def inline_lifecycle(settings: Settings) -> Lifecycle:
    """A lifecycle that does admission and admitted starts in the calling thread (events stay
    in the outbox for a worker's relay)."""
    dispatcher = InlineDispatcher()
    lifecycle = Lifecycle.from_settings(settings, dispatcher)
    dispatcher.lifecycle = lifecycle
    return lifecycle
