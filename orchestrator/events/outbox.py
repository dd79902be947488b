"""An event is an ``event_outbox`` row first, written in the transaction of the transition it
reports (a rollback sends nothing); the relay publishes it after the commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from orchestrator.db import AfterCommit, OutboxEvent, after_commit
from orchestrator.events.bodies import body_for, routing_key


@dataclass(frozen=True)
class Update:
    """A status change, as its event needs it (``session.active`` is written by the statement
    that records a start: ``store.starts``)."""

    status: str
    request_id: str
    vendor_session_id: str | None
    expires_at: datetime | None
    traceparent: str | None
    fields: dict[str, Any] = field(default_factory=dict)  # body_for's optional keywords


def emit(session: Session, updates: Sequence[Update], now: datetime) -> None:
    """Queue one event per status change (``now``: the database's time of the transaction),
    from the values written, without loading the rows; one INSERT for the lot. A relay is
    woken after the commit."""
    if not updates:
        return
    values = []
    for update in updates:
        event_id = uuid.uuid4()
        body = body_for(
            event_id,
            now,
            status=update.status,
            request_id=update.request_id,
            vendor_session_id=update.vendor_session_id,
            expires_at=update.expires_at,
            **update.fields,
        )
        values.append(
            {
                "event_id": event_id,
                "routing_key": routing_key(update.status),
                "body": body,
                "traceparent": update.traceparent,
                "created_at": now,
            }
        )
    session.connection().execute(insert(OutboxEvent), values)
    after_commit(session, AfterCommit.EVENTS_PENDING)
