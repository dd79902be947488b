"""What the webhook tests share besides fixtures: the encryption key of the run, events
through the real outbox, a sender driven pass by pass."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from orchestrator.db import Database
from orchestrator.events.outbox import Update, emit
from orchestrator.webhooks.secrets import new_key
from orchestrator.webhooks.sender import Sender

KEY = new_key()


def emit_events(db: Database, request_id: str, statuses: list[str]) -> None:
    """Events of one session through the outbox, one transaction each (as transitions are)."""
    for status in statuses:
        with db.transaction() as session:
            emit(
                session,
                [Update(status, request_id, f"v-{request_id}", None, None)],
                datetime.now(UTC),
            )


def drain(sender: Sender, done: Callable[[], bool], timeout: float = 20.0) -> None:
    """Pass after pass until ``done()`` (and nothing is in flight) or the timeout fails it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sender.pass_once()
        if sender.in_flight() == 0 and done():
            return
        time.sleep(0.02)
    raise AssertionError("the sender did not finish in time")
