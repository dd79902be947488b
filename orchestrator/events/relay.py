"""The relay: unpublished outbox rows, in order, handed to a publisher; marked published only
once the broker confirmed them, so a broker outage loses nothing. A crash between the
confirm and the mark sends a batch again (at least once).

No transaction (and no row lock) is held while a batch is published: a publish may wait for
the broker up to its bound (an alarm, a lost majority). One relay at a time, across every
process, is kept by a session-level advisory lock instead; a relay that finds it taken waits
(bounded) for it, then reads what the other one left.

Each process runs one relay thread (:class:`RelayThread`), woken after every commit that
queued events, so publishing never holds up a task's thread; beat's backstop runs a pass too.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update

from orchestrator.db import Database, OutboxEvent

logger = logging.getLogger(__name__)
BATCH_SIZE = 100
RELAY_LOCK_KEY = 0x6F7574626F78  # "outbox": pg_advisory_lock's key for the one running relay
LOCK_WAIT_SECONDS = 30.0


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
)
_MARK_PUBLISHED = (
    update(OutboxEvent)
    .where(OutboxEvent.id.in_(bindparam("ids", expanding=True)))
    .values(published_at=func.clock_timestamp())  # the database's clock, as every time
)


def relay(
    db: Database,
    publish: PublishBatch,
    *,
    max_batches: int = 100,
    lock_wait: float = LOCK_WAIT_SECONDS,
) -> int:
    """Publish unpublished events in id order; returns how many were marked published.

    ``publish`` must raise unless the broker confirmed every message of the batch (and within
    a bound); the rows are then left for the next relay. Each statement commits on its own:
    nothing is locked while ``publish`` waits. Returns 0 without relaying if another relay
    held the lock for all of ``lock_wait``.
    """
    with db.autocommit() as connection:
        if not _lock(connection, lock_wait):
            logger.info("another event relay is running; its pass covers these events")
            return 0
        try:
            return _relay_locked(connection, publish, max_batches)
        finally:
            _unlock(connection)


def _relay_locked(connection: Connection, publish: PublishBatch, max_batches: int) -> int:
    total = 0
    for _ in range(max_batches):
        rows = connection.execute(_NEXT_BATCH).all()
        if rows:
            publish([PendingEvent(r.event_id, r.routing_key, r.body, r.traceparent) for r in rows])
            connection.execute(_MARK_PUBLISHED, {"ids": [r.id for r in rows]})
        total += len(rows)
        if len(rows) < BATCH_SIZE:
            break
    return total


def _lock(connection: Connection, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while not connection.execute(select(func.pg_try_advisory_lock(RELAY_LOCK_KEY))).scalar():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _unlock(connection: Connection) -> None:
    """Release the lock; a connection that cannot is discarded (the server then releases
    it), never handed back to the pool still holding it."""
    try:
        connection.execute(select(func.pg_advisory_unlock(RELAY_LOCK_KEY)))
    except Exception:
        connection.invalidate()
        raise


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
