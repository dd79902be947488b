"""The outbox relay: lifecycle events are rows first (written with the transition they report)
and messages second, so a rollback sends nothing and a broker outage loses nothing.

Delivery is at least once: a crash between the broker's confirm and our commit sends a batch
again, so consumers de-duplicate on ``event_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import select

from orchestrator.db import Database, OutboxEvent
from orchestrator.db.types import utcnow

BATCH_SIZE = 100
PublishBatch = Callable[[Sequence[OutboxEvent]], None]


def relay(db: Database, publish: PublishBatch, *, max_batches: int = 100) -> int:
    """Publish unpublished events in id order; returns how many were marked published.

    ``publish`` must raise unless the broker confirmed every message of the batch; the rows are
    then left for the next relay. Concurrent relays skip each other's locked rows.
    """
    total = 0
    for _ in range(max_batches):
        with db.transaction() as session:
            batch = session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.published_at.is_(None))
                .order_by(OutboxEvent.id)
                .limit(BATCH_SIZE)
                .with_for_update(skip_locked=True)
            ).all()
            if batch:
                publish(batch)
                now = utcnow()
                for event in batch:
                    event.published_at = now
        total += len(batch)
        if len(batch) < BATCH_SIZE:
            break
    return total
