"""What the phases of the store share: the database's clock, row locks, the terminal
transition and the move to ``stopping``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from orchestrator.contract import without_secrets
from orchestrator.db import (
    LIVE_STATUSES,
    AfterCommit,
    EventKind,
    SessionRow,
    SessionStatus,
    after_commit,
)
from orchestrator.events import outbox
from orchestrator.store import history

S = SessionStatus
MAX_DURATION_REACHED = "MAX_DURATION_REACHED"  # the reaper's end_reason (vendor vocabulary)
USER_CLOSED = "USER_CLOSED"
LIVE_VALUES = [s.value for s in LIVE_STATUSES]
SESSIONS: Table = SessionRow.__table__  # type: ignore[assignment]  # for Core statements


def db_now(session: Session) -> datetime:
    """The database's clock (the transaction's start), the one clock every process shares."""
    now = session.scalar(select(func.now()))
    assert now is not None
    return now


def new_attempt_owner() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class StopTicket:
    """A session this caller moved to ``stopping``; it owes the vendor stop."""

    session_id: uuid.UUID
    request_id: str
    vendor_session_id: str
    reason: str
    traceparent: str | None = None
    expires_at: datetime | None = None


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


# -- admission: the claim --------------------------------------------------------------------
def finish(
    session: Session,
    row: SessionRow,
    status: SessionStatus,
    now: datetime,
    *,
    end_reason: str | None = None,
    **detail: Any,
) -> None:
    """The one terminal transition: clears the LiveKit token, the lease and the payload's
    secrets."""
    if row.status in LIVE_VALUES:
        after_commit(session, AfterCommit.SLOT_FREED)
    row.status = status.value
    row.ended_at = now
    if end_reason is not None:
        row.end_reason = end_reason
    row.livekit_token = None
    row.stop_retry_at = None
    row.attempt_lease_until = None
    row.request_payload = without_secrets(row.request_payload)
    session.flush()
    history.log(
        session,
        EventKind.ENDED if status == S.ENDED else EventKind.FAILED,
        row=row,
        end_reason=row.end_reason,
        error_code=row.error_code,
        **detail,
    )
    outbox.emit(session, row)


# -- stops -----------------------------------------------------------------------------------


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
        row.id, row.request_id, row.vendor_session_id, reason, row.traceparent, row.expires_at
    )
