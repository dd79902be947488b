"""Lifecycle events (``session.active|ended|failed``), written to the outbox in the same
transaction as the transition they report, so a rollback sends none."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert
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
    return body_for(
        event_id,
        occurred_at,
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


def body_for(
    event_id: uuid.UUID,
    occurred_at: datetime,
    *,
    status: str,
    request_id: str,
    vendor_session_id: str | None,
    expires_at: datetime | None,
    livekit_url: str | None = None,
    livekit_room: str | None = None,
    livekit_token: str | None = None,
    end_reason: str | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": str(event_id),
        "version": EVENT_VERSION,
        "request_id": request_id,
        "session_id": vendor_session_id,
        "status": status,
        "occurred_at": _iso(occurred_at),
        "expires_at": _iso(expires_at),
    }
    if status == "active":
        body.update(url=livekit_url, room_name=livekit_room, token=livekit_token)
    elif status == "ended":
        body["end_reason"] = end_reason
    elif status == "failed":
        body.update(error_code=error_code, error_message=error_message)
    return body


def emit(session: Session, row: SessionRow) -> None:
    """Queue the event for the row's current (active/ended/failed) status."""
    event_id = uuid.uuid4()
    session.add(
        OutboxEvent(
            event_id=event_id,
            routing_key=ROUTING_KEYS[row.status],
            body=event_body(row, event_id, utcnow()),
            traceparent=row.traceparent,
        )
    )
    signal_after_commit(session, EVENTS_PENDING)


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
    now = utcnow()
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
                "routing_key": ROUTING_KEYS[update.status],
                "body": body,
                "traceparent": update.traceparent,
                "created_at": now,
            }
        )
    session.connection().execute(insert(OutboxEvent), values)
    signal_after_commit(session, EVENTS_PENDING)


@dataclass(frozen=True)
class Entry:
    session_id: uuid.UUID | None
    vendor_session_id: str | None
    detail: dict[str, Any]


def log_now(session: Session, kind: EventKind, entries: Sequence[Entry]) -> None:
    """``log`` as one Core INSERT, executed at once (no ORM objects, no flush)."""
    if not entries:
        return
    now = utcnow()
    session.connection().execute(
        insert(SessionEvent),
        [
            {
                "session_id": entry.session_id,
                "vendor_session_id": entry.vendor_session_id,
                "kind": kind.value,
                "detail": entry.detail,
                "occurred_at": now,
            }
            for entry in entries
        ],
    )


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
