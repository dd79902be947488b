"""What the phases of the store share: the database's clock, row locks and the move to
``stopping`` (the terminal transition is :mod:`.ending`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from orchestrator.db import LIVE_STATUSES, EventKind, SessionRow, SessionStatus
from orchestrator.store import history

S = SessionStatus
MAX_DURATION_REACHED = "MAX_DURATION_REACHED"  # the reaper's end_reason (vendor vocabulary)
USER_CLOSED = "USER_CLOSED"
DEFAULT_ACCOUNT = "default"  # rows from before accounts, and today's single-account settings
LIVE_VALUES = [s.value for s in LIVE_STATUSES]
SESSIONS: Table = SessionRow.__table__  # type: ignore[assignment]  # for Core statements


def db_now(session: Session) -> datetime:
    """The database's clock (the transaction's start), the one clock every process shares."""
    now = session.scalar(select(func.now()))
    assert now is not None
    return now


def new_attempt_owner() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, kw_only=True)
class StopTicket:
    """A session this caller moved to ``stopping``; it owes the vendor stop."""

    session_id: uuid.UUID
    request_id: str
    vendor_session_id: str
    reason: str
    traceparent: str | None = None
    expires_at: datetime | None = None
    account: str | None = DEFAULT_ACCOUNT  # whose key stops it


def lock_row(session: Session, session_id: uuid.UUID) -> SessionRow | None:
    return session.scalars(
        select(SessionRow).where(SessionRow.id == session_id).with_for_update()
    ).one_or_none()


def insert_ignoring_conflict(values: dict[str, Any]) -> Any:
    return (
        postgresql.insert(SessionRow)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(SessionRow.id)
    )


def to_stopping(
    session: Session, row: SessionRow, reason: str, now: datetime, retry_in: float
) -> StopTicket:
    assert row.vendor_session_id is not None
    row.status = S.STOPPING.value
    row.end_reason = reason
    row.stop_requested_at = row.stop_requested_at or now
    row.stop_retry_at = now + timedelta(seconds=retry_in)
    history.log(session, EventKind.STOP_REQUESTED, row=row, reason=reason)
    return StopTicket(
        session_id=row.id,
        request_id=row.request_id,
        vendor_session_id=row.vendor_session_id,
        reason=reason,
        traceparent=row.traceparent,
        expires_at=row.expires_at,
        account=row.account,
    )
