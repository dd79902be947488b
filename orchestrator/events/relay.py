"""The relay: unpublished outbox rows, in order, handed to a publisher; marked published only
once the broker confirmed them, so a broker outage loses nothing. A crash between the
confirm and the mark sends a batch again (at least once).

Each process runs one relay thread (:class:`RelayThread`), woken after every commit that
queued events, so publishing never holds up a task's thread; beat's backstop runs a pass too.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select, update

from orchestrator.db import Database, OutboxEvent

logger = logging.getLogger(__name__)
BATCH_SIZE = 100


@dataclass(frozen=True)
class PendingEvent:
    event_id: uuid.UUID
    routing_key: str
    body: dict[str, Any]
    traceparent: str | None


PublishBatch = Callable[[Sequence[PendingEvent]], None]

# Core statements: the relay runs after every start, and ORM objects cost more than the publish.
_NEXT_BATCH = (
    select(
        OutboxEvent.id,
        OutboxEvent.event_id,
        OutboxEvent.routing_key,
        OutboxEvent.body,
        OutboxEvent.traceparent,
    )
    .where(OutboxEvent.published_at.is_(None))
    .order_by(OutboxEvent.id)
    .limit(BATCH_SIZE)
    .with_for_update(skip_locked=True)
)
_MARK_PUBLISHED = (
    update(OutboxEvent)
    .where(OutboxEvent.id.in_(bindparam("ids", expanding=True)))
    .values(published_at=func.clock_timestamp())  # the database's clock, as every time
)


def relay(db: Database, publish: PublishBatch, *, max_batches: int = 100) -> int:
    """Publish unpublished events in id order; returns how many were marked published.

    ``publish`` must raise unless the broker confirmed every message of the batch; the rows are
    then left for the next relay. Concurrent relays skip each other's locked rows.
    """
    total = 0
    for _ in range(max_batches):
        with db.transaction() as session:
            connection = session.connection()
            rows = connection.execute(_NEXT_BATCH).all()
            if rows:
                publish(
                    [PendingEvent(r.event_id, r.routing_key, r.body, r.traceparent) for r in rows]
                )
                connection.execute(_MARK_PUBLISHED, {"ids": [r.id for r in rows]})
        total += len(rows)
        if len(rows) < BATCH_SIZE:
            break
    return total


class RelayThread:
    """One relay thread per process: :meth:`wake` after a commit that queued events."""

    def __init__(self, database: Callable[[], Database], publish: PublishBatch) -> None:
        self._database = database
        self._publish = publish
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def wake(self) -> None:
        self._wanted.set()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run_forever, name="event-relay", daemon=True
                )
                self._thread.start()

    def relay_now(self) -> None:
        """One pass in this thread; failures leave the rows for the next pass."""
        try:
            relay(self._database(), self._publish)
        except Exception:
            logger.warning("event relay failed; events stay in the outbox", exc_info=True)

    def _run_forever(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            self.relay_now()
