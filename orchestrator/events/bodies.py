"""What a lifecycle event is: its JSON body (version 1) and its routing key."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

EVENT_VERSION = 1
# An event's ``occurred_at`` is the database's clock, as every time the service compares: this
# expression writes it (as ``datetime.isoformat`` would) inside the statement that queues the
# event, when the time is not read beforehand.
DATABASE_NOW_ISO = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"
ROUTING_KEYS = {
    "waiting": "session.waiting",
    "active": "session.active",
    "ended": "session.ended",
    "failed": "session.failed",
}


def routing_key(status: str) -> str:
    """``session.<status>`` for the statuses that make an event (waiting, active, ended,
    failed)."""
    return ROUTING_KEYS[status]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def body_for(
    event_id: uuid.UUID,
    occurred_at: datetime | None,
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
    position: int | None = None,
    wait_p50_seconds: float | None = None,
    wait_p90_seconds: float | None = None,
    estimated_at: datetime | None = None,
) -> dict[str, Any]:
    """The body consumers read: ``session.waiting`` the request's expected wait (position,
    p50 and p90 in seconds from ``estimated_at``; a wait with no end in sight is null),
    ``session.active`` the LiveKit credentials, ``session.ended`` the end reason,
    ``session.failed`` the error. ``occurred_at`` is the
    database's time (None: the statement writing the body sets it, with DATABASE_NOW_ISO)."""
    body: dict[str, Any] = {
        "event_id": str(event_id),
        "version": EVENT_VERSION,
        "request_id": request_id,
        "session_id": vendor_session_id,
        "status": status,
        "occurred_at": _iso(occurred_at),
        "expires_at": _iso(expires_at),
    }
    if status == "waiting":
        body.update(
            position=position,
            wait_p50_seconds=wait_p50_seconds,
            wait_p90_seconds=wait_p90_seconds,
            estimated_at=_iso(estimated_at),
        )
    elif status == "active":
        body.update(url=livekit_url, room_name=livekit_room, token=livekit_token)
    elif status == "ended":
        body["end_reason"] = end_reason
    elif status == "failed":
        body.update(error_code=error_code, error_message=error_message)
    return body
