"""Readable tables and JSON records of sessions for the CLI and the demo; tokens are never
shown. Every time is UTC and written with ``Z``: ISO 8601 in JSON and logs
(``2026-12-01T14:18:05Z``), the time of day in tables (``14:18:05Z``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from orchestrator.db import LIVE_STATUSES, Database, SessionRow, SessionStatus

COLUMNS = (
    "request_id",
    "status",
    "avatar",
    "vendor session",
    "room",
    "started",
    "expires",
    "ended",
    "why",
)
# What `sessions --json` shows of a row (never the token or the request payload).
RECORD_FIELDS = {
    "request_id": "request_id",
    "status": "status",
    "avatar_id": "avatar_id",
    "session_id": "vendor_session_id",
    "livekit_room": "livekit_room",
    "created_at": "created_at",
    "started_at": "started_at",
    "expires_at": "expires_at",
    "ended_at": "ended_at",
    "end_reason": "end_reason",
    "error_code": "error_code",
}


def utc_iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with ``Z`` (seconds, or microseconds when there are any)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def utc_clock(value: datetime | None) -> str:
    """The time of day in UTC, ``14:18:05Z``; ``-`` for none."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%H:%M:%SZ")


def _short(value: str | None, width: int = 22) -> str:
    if not value:
        return "-"
    return value if len(value) <= width else value[: width - 1] + "…"


def _select_rows(database: Database, *, live_only: bool, limit: int) -> list[SessionRow]:
    query = select(SessionRow).order_by(SessionRow.created_at).limit(limit)
    if live_only:
        statuses = [s.value for s in (SessionStatus.WAITING, *LIVE_STATUSES)]
        query = query.where(SessionRow.status.in_(statuses))
    with database.transaction() as session:
        return list(session.scalars(query).all())


def session_records(database: Database, *, live_only: bool, limit: int) -> list[dict[str, Any]]:
    """Full, untruncated fields of each row, times in UTC ISO 8601; no token."""
    records = []
    for r in _select_rows(database, live_only=live_only, limit=limit):
        record: dict[str, Any] = {}
        for key, attribute in RECORD_FIELDS.items():
            value = getattr(r, attribute)
            record[key] = utc_iso(value) if isinstance(value, datetime) else value
        records.append(record)
    return records


def session_rows(database: Database, *, live_only: bool, limit: int) -> list[tuple[str, ...]]:
    return [
        (
            _short(r.request_id),
            r.status,
            _short(r.avatar_id, 14),
            _short(r.vendor_session_id, 14),
            _short(r.livekit_room, 16),
            utc_clock(r.started_at),
            utc_clock(r.expires_at),
            utc_clock(r.ended_at),
            r.end_reason or r.error_code or "",
        )
        for r in _select_rows(database, live_only=live_only, limit=limit)
    ]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    line = "  ".join("{:<%d}" % w for w in widths)  # noqa: UP031 - builds a format string
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out.extend(line.format(*row) for row in rows)
    return "\n".join(out)


def session_table(database: Database, *, live_only: bool = True, limit: int = 50) -> str:
    rows = session_rows(database, live_only=live_only, limit=limit)
    if not rows:
        return "no live sessions" if live_only else "no sessions"
    return format_table(COLUMNS, rows)
