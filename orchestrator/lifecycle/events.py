"""Lifecycle events (``session.active|ended|failed``), written to the outbox in the same
transaction as the transition they report, so a rollback sends none."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from orchestrator.db import EventKind, OutboxEvent, SessionEvent, SessionRow
from orchestrator.db.engine import signal_after_commit
from orchestrator.db.types import utcnow

EVENT_VERSION = 1
EVENTS_PENDING = "events_pending"
ROUTING_KEYS = {"active": "session.active", "ended": "session.ended", "failed": "session.failed"}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def event_body(row: SessionRow, event_id: uuid.UUID, occurred_at: datetime) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": str(event_id),
        "version": EVENT_VERSION,
        "request_id": row.request_id,
        "session_id": row.vendor_session_id,
        "status": row.status,
        "occurred_at": _iso(occurred_at),
        "expires_at": _iso(row.expires_at),
    }
    if row.status == "active":
        body.update(url=row.livekit_url, room_name=row.livekit_room, token=row.livekit_token)
    elif row.status == "ended":
        body["end_reason"] = row.end_reason
    elif row.status == "failed":
        body.update(error_code=row.error_code, error_message=row.error_message)
    return body


def emit(session: Session, row: SessionRow) -> None:
    """Queue the event for the row's current (active/ended/failed) status."""
    routing_key = ROUTING_KEYS[row.status]
    event_id = uuid.uuid4()
    session.add(
        OutboxEvent(
            event_id=event_id,
            routing_key=routing_key,
            body=event_body(row, event_id, utcnow()),
            traceparent=row.traceparent,
        )
    )
    signal_after_commit(session, EVENTS_PENDING)


def log(
    session: Session,
    kind: EventKind,
    *,
    row: SessionRow | None = None,
    session_id: uuid.UUID | None = None,
    vendor_session_id: str | None = None,
    **detail: Any,
) -> None:
    """Append to ``session_events``; never pass secrets in ``detail``."""
    session.add(
        SessionEvent(
            session_id=row.id if row is not None else session_id,
            vendor_session_id=vendor_session_id or (row.vendor_session_id if row else None),
            kind=kind.value,
            detail=detail,
        )
    )
