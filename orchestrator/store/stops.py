"""Stops: a stop request applied to its row (or remembered for a start not yet claimed),
the reaper's claim of expired rows, and the end of confirmed stops."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Interval, bindparam, delete, func, select
from sqlalchemy.dialects import postgresql

from orchestrator.backoff import exponential_backoff
from orchestrator.db import Database, EarlyStop, EventKind, SessionRow
from orchestrator.store import history
from orchestrator.store.admission import lock_admission, lock_request
from orchestrator.store.ending import Ended, end, end_row
from orchestrator.store.rows import (
    MAX_DURATION_REACHED,
    SESSIONS,
    S,
    StopTicket,
    db_now,
    lock_row,
    to_stopping,
)


@dataclass(frozen=True)
class StopRequestResult:
    found: bool
    status_before: str | None
    ticket: StopTicket | None
    remembered: bool = False  # no row yet: kept in early_stops for the start to find


def request_stop(
    db: Database,
    *,
    request_id: str | None = None,
    vendor_session_id: str | None = None,
    reason: str,
    retry_in: float,
) -> StopRequestResult:
    """Apply a stop request to the row; a ticket means this caller owes the vendor stop.

    A stop by ``request_id`` that finds no row came before its start (the queues are separate):
    it is remembered under the request's lock, which the claim of that start takes first, so
    no claim can slip in between the look for a row and the memo (and under the previous
    release's global lock too, which its claims take: migration 0007, "Mixed fleet").
    """
    with db.transaction() as session:
        query = select(SessionRow).with_for_update()
        if request_id is not None:
            query = query.where(SessionRow.request_id == request_id)
        else:
            query = query.where(SessionRow.vendor_session_id == vendor_session_id)
        row = session.scalars(query).one_or_none()
        if row is None and request_id is not None:
            lock_request(session, request_id)
            lock_admission(session)
            row = session.scalars(query).one_or_none()  # a claim may have committed meanwhile
            if row is None:
                session.execute(
                    postgresql.insert(EarlyStop)
                    .values(request_id=request_id, reason=reason)
                    .on_conflict_do_nothing(index_elements=["request_id"])
                )
                history.log(
                    session, EventKind.STOP_BEFORE_START, request_id=request_id, reason=reason
                )
                return StopRequestResult(False, None, None, remembered=True)
        if row is None:
            return StopRequestResult(False, None, None)
        before = row.status
        now = db_now(session)
        if row.status == S.WAITING:
            end_row(session, row, S.ENDED, end_reason=reason)
        elif row.status == S.STARTING and row.stop_requested_at is None:
            row.stop_requested_at = now
            row.end_reason = reason
            history.log(
                session, EventKind.STOP_REQUESTED, row=row, reason=reason, while_status=before
            )
        elif row.status == S.ACTIVE:
            return StopRequestResult(True, before, to_stopping(session, row, reason, now, retry_in))
        return StopRequestResult(True, before, None)


def prune_early_stops(db: Database, *, older_than_seconds: float) -> int:
    """Forget stops whose start never came within the retention."""
    with db.transaction() as session:
        pruned = session.execute(
            delete(EarlyStop)
            .where(EarlyStop.requested_at < func.now() - timedelta(seconds=older_than_seconds))
            .returning(EarlyStop.request_id)
        ).all()
        return len(pruned)


def finish_stops(db: Database, outcomes: dict[uuid.UUID, str]) -> list[Ended]:
    """``stopping`` → ``ended`` for the rows whose vendor stop was confirmed (or that the vendor
    said were already gone): ``outcomes`` maps row id → vendor outcome. One transaction (and
    :func:`.ending.end`'s three statements) for a whole sweep batch; returns the rows that were
    still ``stopping`` (now ``ended``)."""
    if not outcomes:
        return []
    with db.transaction() as session:
        return end(
            session,
            outcomes,
            S.ENDED,
            from_statuses=[S.STOPPING],
            detail_of={row_id: {"vendor_outcome": o} for row_id, o in outcomes.items()},
        )


def stop_failed(
    db: Database, session_id: uuid.UUID, *, error: str, base_delay: float, max_delay: float
) -> None:
    """Keep the row ``stopping``; the reaper tries again after a jittered, capped backoff."""
    with db.transaction() as session:
        row = lock_row(session, session_id)
        if row is None or row.status != S.STOPPING:
            return
        row.stop_attempts += 1
        delay = exponential_backoff(row.stop_attempts, base=base_delay, cap=max_delay)
        row.stop_retry_at = db_now(session) + timedelta(seconds=delay)
        history.log(
            session, EventKind.STOP_ATTEMPT_FAILED, row=row, attempt=row.stop_attempts, error=error
        )


_CLAIM_EXPIRED = (
    SESSIONS.update()
    .where(
        SESSIONS.c.id.in_(
            select(SESSIONS.c.id)
            .where(SESSIONS.c.status == S.ACTIVE.value, SESSIONS.c.expires_at <= func.now())
            .order_by(SESSIONS.c.expires_at)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
    )
    .values(
        status=S.STOPPING.value,
        end_reason=MAX_DURATION_REACHED,
        stop_requested_at=func.coalesce(SESSIONS.c.stop_requested_at, func.now()),
        stop_retry_at=func.now() + bindparam("retry_in", type_=Interval()),
    )
    .returning(
        SESSIONS.c.id,
        SESSIONS.c.request_id,
        SESSIONS.c.vendor_session_id,
        SESSIONS.c.traceparent,
        SESSIONS.c.expires_at,
        SESSIONS.c.account,
    )
)


def claim_due_stops(db: Database, *, limit: int, retry_in: float) -> list[StopTicket]:
    """The reaper's claim: expired ``active`` rows → ``stopping`` (MAX_DURATION_REACHED), plus
    ``stopping`` rows whose last attempt is due again. SKIP LOCKED lets sweeps run side by side.

    The expired rows are claimed by one UPDATE … RETURNING (a thousand sessions may expire
    together); due retries are few and go through the ORM.
    """
    retry = timedelta(seconds=retry_in)
    with db.transaction() as session:
        expired = sorted(
            session.connection().execute(_CLAIM_EXPIRED, {"limit": limit, "retry_in": retry}).all(),
            key=lambda r: r.expires_at,
        )
        reason = MAX_DURATION_REACHED
        tickets = [
            StopTicket(
                session_id=r.id,
                request_id=r.request_id,
                vendor_session_id=r.vendor_session_id,
                reason=reason,
                traceparent=r.traceparent,
                expires_at=r.expires_at,
                account=r.account,
            )
            for r in expired
        ]
        history.log_now(
            session,
            EventKind.STOP_REQUESTED,
            [history.Entry(r.id, r.vendor_session_id, {"reason": reason}) for r in expired],
        )
        due: Sequence[SessionRow] = session.scalars(
            select(SessionRow)
            .where(SessionRow.status == S.STOPPING.value, SessionRow.stop_retry_at <= func.now())
            .order_by(SessionRow.stop_retry_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if due:
            retry_at = db_now(session) + retry
        for row in due:
            assert row.vendor_session_id is not None
            row.stop_retry_at = retry_at
            tickets.append(
                StopTicket(
                    session_id=row.id,
                    request_id=row.request_id,
                    vendor_session_id=row.vendor_session_id,
                    reason=row.end_reason or "ERROR",
                    traceparent=row.traceparent,
                    expires_at=row.expires_at,
                    account=row.account,
                )
            )
    return tickets


def seconds_to_expiries(db: Database, horizon: float, *, limit: int = 10_000) -> list[float]:
    """Seconds from now (the database's) to the expiry of each ``active`` row that expires
    within ``horizon`` seconds."""
    with db.transaction() as session:
        found = session.scalars(
            select(func.extract("epoch", SessionRow.expires_at - func.now()))
            .where(
                SessionRow.status == S.ACTIVE.value,
                SessionRow.expires_at > func.now(),
                SessionRow.expires_at <= func.now() + timedelta(seconds=horizon),
            )
            .order_by(SessionRow.expires_at)
            .limit(limit)
        ).all()
    return [float(s) for s in found]
