"""Readable tables of sessions for the CLI and the demo; tokens are never shown."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

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


def _time(value: datetime | None) -> str:
    return value.strftime("%H:%M:%S") if value is not None else "-"


def _short(value: str | None, width: int = 22) -> str:
    if not value:
        return "-"
    return value if len(value) <= width else value[: width - 1] + "…"


def session_rows(database: Database, *, live_only: bool, limit: int) -> list[tuple[str, ...]]:
    query = select(SessionRow).order_by(SessionRow.created_at).limit(limit)
    if live_only:
        statuses = [s.value for s in (SessionStatus.WAITING, *LIVE_STATUSES)]
        query = query.where(SessionRow.status.in_(statuses))
    with database.transaction() as session:
        rows = session.scalars(query).all()
        return [
            (
                _short(r.request_id),
                r.status,
                _short(r.avatar_id, 14),
                _short(r.vendor_session_id, 14),
                _short(r.livekit_room, 16),
                _time(r.started_at),
                _time(r.expires_at),
                _time(r.ended_at),
                r.end_reason or r.error_code or "",
            )
            for r in rows
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
