"""An event is an ``event_outbox`` row first, written in the transaction of the transition it
reports (a rollback sends nothing); the relay publishes it after the commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from orchestrator.db import AfterCommit, OutboxEvent, SessionRow, after_commit
from orchestrator.events.bodies import body_for, routing_key


def database_now(session: Session) -> datetime:
    """The database's clock (the transaction's start): events are timed by it, not ours."""
    now = session.scalar(select(func.now()))
    assert now is not None
    return now


def emit(session: Session, row: SessionRow) -> None:
    """Queue the event for the row's current (active/ended/failed) status."""
    event_id = uuid.uuid4()
    now = database_now(session)
    body = body_for(
        event_id,
        now,
        status=row.status,
        request_id=row.request_id,
        vendor_session_id=row.vendor_session_id,
        expires_at=row.expires_at,
        livekit_url=row.livekit_url,
        livekit_room=row.livekit_room,
        livekit_token=row.livekit_token,
        end_reason=row.end_reason,
        error_code=row.error_code,
        error_message=row.error_message,
    )
    session.add(
        OutboxEvent(
            event_id=event_id,
            routing_key=routing_key(row.status),
            body=body,
            traceparent=row.traceparent,
            created_at=now,
        )
    )
    after_commit(session, AfterCommit.EVENTS_PENDING)


@dataclass(frozen=True)
class Update:
    """A status change made by a Core statement (the hot paths), as its event needs it."""

    status: str
    request_id: str
    vendor_session_id: str | None
    expires_at: datetime | None
    traceparent: str | None
    fields: dict[str, Any] = field(default_factory=dict)  # body_for's optional keywords


def emit_now(session: Session, updates: Sequence[Update]) -> None:
    """``emit`` for rows changed by a Core UPDATE: the same bodies, from the values written,
    without loading the rows; one INSERT for the lot."""
    if not updates:
        return
    now = database_now(session)
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
