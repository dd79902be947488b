"""The outbox relay: lifecycle events are rows first (written with the transition they report)
and messages second, so a rollback sends nothing and a broker outage loses nothing.

Delivery is at least once: a crash between the broker's confirm and our commit sends a batch
again, so consumers de-duplicate on ``event_id``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update

from orchestrator.db import Database, OutboxEvent
from orchestrator.db.types import utcnow

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
    .values(published_at=bindparam("now"))
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
                connection.execute(_MARK_PUBLISHED, {"ids": [r.id for r in rows], "now": utcnow()})
        total += len(rows)
        if len(rows) < BATCH_SIZE:
            break
    return total
