"""``session_events``: the append-only history of every row (and of orphans, which have
none), timed by the database's clock. Never pass secrets in ``detail``."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert
from sqlalchemy.orm import Session

from orchestrator.db import EventKind, SessionEvent, SessionRow


@dataclass(frozen=True)
class Entry:
    session_id: uuid.UUID | None
    vendor_session_id: str | None
    detail: dict[str, Any]


def log_now(session: Session, kind: EventKind, entries: Sequence[Entry]) -> None:
    """``log`` as one Core INSERT, executed at once (no ORM objects, no flush)."""
    if not entries:
        return
    session.connection().execute(
        insert(SessionEvent).values(occurred_at=func.now()),
        [
            {
                "session_id": entry.session_id,
                "vendor_session_id": entry.vendor_session_id,
                "kind": kind.value,
                "detail": entry.detail,
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
            occurred_at=func.now(),  # the database's clock, not this process's
        )
    )
