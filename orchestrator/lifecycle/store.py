"""Every state change of a session row: one short transaction each, guarded by a row lock
(``SELECT … FOR UPDATE``) or a conditional UPDATE. Every time compared across processes —
expiry, start timeouts, leases, retry times — is the database's ``now()``, never a host's
clock."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import Interval, Table, bindparam, delete, func, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from orchestrator.db import (
    LIVE_STATUSES,
    Database,
    EarlyStop,
    EventKind,
    SessionRow,
    SessionStatus,
    SweepLease,
)
from orchestrator.db.engine import signal_after_commit
from orchestrator.db.types import JSONDocument, UTCDateTime, utcnow
from orchestrator.lifecycle import events
from orchestrator.lifecycle.requests import storable, without_secrets

S = SessionStatus
SLOT_FREED = "slot_freed"
MAX_DURATION_REACHED = "MAX_DURATION_REACHED"  # the reaper's end_reason (vendor vocabulary)
USER_CLOSED = "USER_CLOSED"
ADMISSION_LOCK_KEY = 0x5E5511  # pg_advisory_xact_lock: one admission decision at a time
# A lease that ran out this recently may be about to be taken over by the same message's
# redelivery, which waited for it: the reconciler leaves it that long before failing the row.
LEASE_GRACE_SECONDS = 5.0
LIVE_VALUES = [s.value for s in LIVE_STATUSES]


def db_now(session: Session) -> datetime:
    """The database's clock (the transaction's start), the one clock every process shares."""
    now = session.scalar(select(func.now()))
    assert now is not None
    return now


def new_attempt_owner() -> str:
    return uuid.uuid4().hex


class ClaimOutcome(Enum):
    NEW = "new"  # this message created the row
    RESUME = "resume"  # the same message again (redelivery): carry on from the row's state
    DUPLICATE = "duplicate"  # another message with the same request_id and payload
    CONFLICT = "conflict"  # same request_id, different payload: ignored, recorded
    CANCELLED = "cancelled"  # a stop came before the start: recorded as ended


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    session_id: uuid.UUID
    status: str
    ticket: StartTicket | None = None  # a new row admitted at once: its first attempt counted


@dataclass(frozen=True)
class StartTicket:
    """What a worker needs to call the vendor, read in the transaction that began the attempt
    (and took its lease: ``owner`` is the attempt's id)."""

    session_id: uuid.UUID
    request_id: str
    payload: dict[str, Any]
    attempt: int
    sent_at: datetime
    created_at: datetime
    traceparent: str | None
    owner: str


@dataclass(frozen=True)
class AttemptBusy:
    """Another delivery of this start holds the attempt's lease for ``seconds`` more."""

    seconds: float


@dataclass(frozen=True)
class StopTicket:
    """A session this caller moved to ``stopping``; it owes the vendor stop."""

    session_id: uuid.UUID
    request_id: str
    vendor_session_id: str
    reason: str
    traceparent: str | None = None
    expires_at: datetime | None = None


def _lock_row(session: Session, session_id: uuid.UUID) -> SessionRow | None:
    return session.scalars(
        select(SessionRow).where(SessionRow.id == session_id).with_for_update()
    ).one_or_none()


def _insert_ignoring_conflict(values: dict[str, Any]) -> Any:
    return (
        postgresql.insert(SessionRow)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(SessionRow.id)
    )


# -- admission: the claim --------------------------------------------------------------------

_CLAIM = text(
    "SELECT session_id, status, cap, live, waiting, cancelled, at FROM orchestrator_claim("
    ":id, :request_id, :claim_id, :avatar_id, :payload, :digest, :metadata,"
    " :max_duration_seconds, :start_deadline_seconds, :traceparent, :configured_cap,"
    " :attempt_owner, :lease_seconds)"
).bindparams(
    bindparam("payload", type_=JSONDocument),
    bindparam("metadata", type_=JSONDocument),
)


@dataclass(frozen=True)
class ClaimRequest:
    """A start request as the claim stores it."""

    request_id: str
    claim_id: str
    payload: dict[str, Any]
    digest: str
    avatar_id: str
    metadata: dict[str, Any] | None
    max_duration_seconds: int | None
    start_deadline_seconds: int | None
    traceparent: str | None


def claim(
    db: Database, request: ClaimRequest, *, max_concurrent_sessions: int, lease_seconds: float
) -> Claim:
    """Create the row for the request — ``starting`` (its first attempt counted, its lease
    taken) if a slot is free and nobody waits, else ``waiting`` — or say why this message finds
    one already. A stop that came first ends the request here, with no vendor call."""
    for _ in range(3):
        claimed = _try_claim(db, request, max_concurrent_sessions, lease_seconds)
        if claimed is not None:
            return claimed
    # An early stop and its pruning raced this claim three times: let the message retry.
    raise RuntimeError(f"claim of request {request.request_id} did not settle")


def _try_claim(
    db: Database, request: ClaimRequest, max_concurrent_sessions: int, lease_seconds: float
) -> Claim | None:
    owner = new_attempt_owner()
    with db.autocommit() as connection:
        found = connection.execute(
            _CLAIM,
            {
                "id": uuid.uuid4(),
                "request_id": request.request_id,
                "claim_id": request.claim_id,
                "avatar_id": request.avatar_id,
                "payload": request.payload,
                "digest": request.digest,
                "metadata": request.metadata,
                "max_duration_seconds": request.max_duration_seconds,
                "start_deadline_seconds": request.start_deadline_seconds,
                "traceparent": request.traceparent,
                "configured_cap": max_concurrent_sessions,
                "attempt_owner": owner,
                "lease_seconds": lease_seconds,
            },
        ).one()
    if found.cancelled:
        cancelled = _record_cancelled(db, request)
        if cancelled is not None:
            return Claim(ClaimOutcome.CANCELLED, cancelled, S.ENDED.value)
    elif found.session_id is not None:
        admission = AdmissionState(found.cap, found.live, found.waiting)
        if found.status == S.WAITING:
            # The message is acknowledged on the strength of this claim, which committed
            # without waiting for the disk: make it durable first.
            db.durability_barrier()
            if admission.free > 0:
                db.signal(SLOT_FREED)  # others wait while slots are free: admit them FIFO
            return Claim(ClaimOutcome.NEW, found.session_id, found.status)
        ticket = StartTicket(
            found.session_id,
            request.request_id,
            request.payload,
            1,
            found.at,
            found.at,
            request.traceparent,
            owner,
        )
        return Claim(ClaimOutcome.NEW, found.session_id, found.status, ticket)
    return _existing_row(db, request)


def _existing_row(db: Database, request: ClaimRequest) -> Claim | None:
    with db.transaction() as session:
        row = session.scalars(
            select(SessionRow).where(SessionRow.request_id == request.request_id).with_for_update()
        ).one_or_none()
        if row is None:  # the early stop this claim saw was used up or pruned: claim again
            return None
        if row.claim_id == request.claim_id and row.payload_sha256 == request.digest:
            outcome = ClaimOutcome.RESUME
        elif row.payload_sha256 == request.digest:
            events.log(session, EventKind.DUPLICATE, row=row, claim_id=request.claim_id)
            outcome = ClaimOutcome.DUPLICATE
        else:
            events.log(
                session,
                EventKind.DUPLICATE_CONFLICT,
                row=row,
                claim_id=request.claim_id,
                note="same request_id with a different payload; the repeat was ignored",
            )
            outcome = ClaimOutcome.CONFLICT
        claim = Claim(outcome, row.id, row.status)
    if outcome is ClaimOutcome.RESUME:
        # The first delivery's claim may not have reached the disk yet; what follows may
        # write nothing before this delivery is acknowledged.
        db.durability_barrier()
    return claim


def _record_cancelled(db: Database, request: ClaimRequest) -> uuid.UUID | None:
    """The row of a request whose stop came first: ``ended`` at once, in one transaction with
    the early stop's removal (so a crash in between leaves the early stop for a redelivery).
    None if another delivery got there first."""
    with db.transaction() as session:
        early = session.scalars(
            select(EarlyStop).where(EarlyStop.request_id == request.request_id).with_for_update()
        ).one_or_none()
        if early is None:
            return None
        now = db_now(session)
        new_id = session.execute(
            _insert_ignoring_conflict(
                {
                    "id": uuid.uuid4(),
                    "request_id": request.request_id,
                    "claim_id": request.claim_id,
                    "status": S.WAITING.value,
                    "avatar_id": request.avatar_id,
                    "request_payload": request.payload,
                    "payload_sha256": request.digest,
                    "session_metadata": request.metadata,
                    "max_duration_seconds": request.max_duration_seconds,
                    "traceparent": request.traceparent,
                    "created_at": now,
                    "stop_requested_at": early.requested_at,
                }
            )
        ).scalar_one_or_none()
        if new_id is None:
            return None
        session.delete(early)
        row = session.get_one(SessionRow, new_id)
        session_id: uuid.UUID = row.id
        events.log(session, EventKind.CREATED, row=row, claim_id=request.claim_id, status="waiting")
        _finish(session, row, S.ENDED, now, end_reason=early.reason, stopped_before_start=True)
        return session_id


def record_invalid(
    db: Database,
    *,
    request_id: str,
    claim_id: str,
    payload: dict[str, Any],
    digest: str,
    error_code: str,
    message: str,
    traceparent: str | None,
) -> uuid.UUID | None:
    """A message that decoded but cannot be started becomes a ``failed`` row (its payload kept
    as storable text, without secrets)."""
    payload = storable(payload)
    message = storable(message)
    avatar = payload.get("avatar_id")
    with db.transaction() as session:
        now = db_now(session)
        new_id = session.execute(
            _insert_ignoring_conflict(
                {
                    "id": uuid.uuid4(),
                    "request_id": request_id,
                    "claim_id": claim_id,
                    "status": S.FAILED.value,
                    "avatar_id": avatar if isinstance(avatar, str) else None,
                    "request_payload": payload,
                    "payload_sha256": digest,
                    "error_code": error_code,
                    "error_message": message,
                    "traceparent": traceparent,
                    "created_at": now,
                    "ended_at": now,
                }
            )
        ).scalar_one_or_none()
        if new_id is None:
            row = session.scalars(
                select(SessionRow).where(SessionRow.request_id == request_id)
            ).one()
            if row.claim_id != claim_id:
                events.log(
                    session, EventKind.DUPLICATE_CONFLICT, row=row, claim_id=claim_id, error=message
                )
            return None
        row = session.get_one(SessionRow, new_id)
        events.log(session, EventKind.FAILED, row=row, error_code=error_code, error=message)
        events.emit(session, row)
        return row.id


# -- starts ----------------------------------------------------------------------------------


def begin_attempt(
    db: Database,
    session_id: uuid.UUID,
    claim_id: str,
    *,
    lease_seconds: float,
    abandoned_attempt: str | None = None,
) -> StartTicket | AttemptBusy | str:
    """Count a vendor start attempt and take its lease. AttemptBusy if another delivery holds
    a live lease (``abandoned_attempt``, an attempt this message itself gave up on, does not
    count); else the row's status if this claim has no start to make.

    A stop that arrived before any vendor call ends the row here, with no call at all.
    """
    with db.transaction() as session:
        row = _lock_row(session, session_id)
        if row is None:
            return "gone"
        if row.vendor_session_id is not None or row.claim_id != claim_id:
            return row.status
        now = db_now(session)
        if row.stop_requested_at is not None and row.status in (S.WAITING, S.STARTING):
            _finish(session, row, S.ENDED, now, end_reason=row.end_reason or USER_CLOSED)
            return row.status
        if row.status != S.STARTING:
            return row.status
        lease = row.attempt_lease_until
        if lease is not None and lease > now and row.attempt_owner != abandoned_attempt:
            return AttemptBusy((lease - now).total_seconds())
        owner = new_attempt_owner()
        row.attempts += 1
        row.start_sent_at = now
        row.attempt_owner = owner
        row.attempt_lease_until = now + timedelta(seconds=lease_seconds)
        events.log(session, EventKind.START_ATTEMPT, row=row, attempt=row.attempts)
        return StartTicket(
            row.id,
            row.request_id,
            dict(row.request_payload),
            row.attempts,
            now,
            row.created_at,
            row.traceparent,
            owner,
        )


@dataclass(frozen=True)
class VendorStart:
    vendor_session_id: str
    voice_id: str | None
    livekit_url: str
    livekit_room: str
    livekit_token: str
    livekit_token_expires_at: datetime | None
    granted_minutes: int | None
    max_session_numbers: int | None
    expires_at: datetime


_SESSIONS: Table = SessionRow.__table__  # type: ignore[assignment]
STOP_RETRY_AFTER_START_SECONDS = 30.0


class NotRecorded(Enum):
    """Why ``record_started`` wrote nothing."""

    GONE = "gone"  # no row at all (lost in a crash of the database): claim the request again
    MOVED_ON = "moved on"  # the row no longer wants this vendor session: stop it again
    PENDING = "pending"  # the row still waits for this attempt's answer: write it again


def record_started(
    db: Database, ticket: StartTicket, start: VendorStart
) -> StopTicket | NotRecorded | None:
    """Store the vendor's answer. Returns None (the row is ``active``), a StopTicket if a stop
    was requested meanwhile (the caller owes the vendor stop), or why nothing was written.

    The hot path of every start: one autocommitted statement (the conditional UPDATE that
    guards the transition — still ``starting``, no vendor session yet, this attempt's lease —,
    the ``active`` event, the outbox row, and the move to ``stopping`` if a stop was requested
    meanwhile), so no transaction waits on this process.
    """
    now = utcnow()  # the event body's occurred_at only; the row's times are the server's
    event_id = uuid.uuid4()
    body = events.body_for(
        event_id,
        now,
        status=S.ACTIVE.value,
        request_id=ticket.request_id,
        vendor_session_id=start.vendor_session_id,
        expires_at=start.expires_at,
        livekit_url=start.livekit_url,
        livekit_room=start.livekit_room,
        livekit_token=start.livekit_token,
    )
    with db.autocommit() as connection:
        marked = connection.execute(
            _RECORD_STARTED,
            {
                "id": ticket.session_id,
                "owner": ticket.owner,
                "vendor_session_id": start.vendor_session_id,
                "voice_id": start.voice_id,
                "livekit_url": start.livekit_url,
                "livekit_room": start.livekit_room,
                "livekit_token": start.livekit_token,
                "livekit_token_expires_at": start.livekit_token_expires_at,
                "granted_minutes": start.granted_minutes,
                "max_session_numbers": start.max_session_numbers,
                "expires_at": start.expires_at,
                "request_payload": without_secrets(ticket.payload),
                "stop_retry_in": timedelta(seconds=STOP_RETRY_AFTER_START_SECONDS),
                "event_id": event_id,
                "routing_key": events.ROUTING_KEYS[S.ACTIVE.value],
                "body": body,
                "traceparent": ticket.traceparent,
            },
        ).one_or_none()
    if marked is None:
        # Nothing matched: find out why (or that an earlier write, whose reply was lost,
        # recorded this very session already).
        state = start_state(db, ticket, start.vendor_session_id)
        if not isinstance(state, NotRecorded):
            db.signal(events.EVENTS_PENDING)
        return state
    db.signal(events.EVENTS_PENDING)
    if marked.status != S.STOPPING:
        return None
    return StopTicket(
        ticket.session_id,
        ticket.request_id,
        start.vendor_session_id,
        marked.end_reason,
        ticket.traceparent,
        start.expires_at,
    )


_RECORD_STARTED = text(
    """
WITH marked AS (
    UPDATE sessions SET
        status = CASE WHEN stop_requested_at IS NULL THEN 'active' ELSE 'stopping' END,
        end_reason = CASE WHEN stop_requested_at IS NULL THEN end_reason
                          ELSE coalesce(end_reason, 'USER_CLOSED') END,
        stop_retry_at = CASE WHEN stop_requested_at IS NULL THEN NULL
                             ELSE now() + :stop_retry_in END,
        vendor_session_id = :vendor_session_id,
        voice_id = :voice_id,
        livekit_url = :livekit_url,
        livekit_room = :livekit_room,
        livekit_token = :livekit_token,
        livekit_token_expires_at = :livekit_token_expires_at,
        granted_max_duration_minutes = :granted_minutes,
        max_session_numbers = :max_session_numbers,
        started_at = now(),
        expires_at = :expires_at,
        attempt_lease_until = NULL,
        request_payload = :request_payload
    WHERE id = :id AND status = 'starting' AND vendor_session_id IS NULL
      AND attempt_owner = :owner
    RETURNING id, attempts, status, end_reason
),
logged AS (
    INSERT INTO session_events (session_id, vendor_session_id, occurred_at, kind, detail)
    SELECT id, :vendor_session_id, now(), kind, detail FROM (
        SELECT 1 AS n, id, 'active' AS kind, jsonb_build_object('attempt', attempts) AS detail
          FROM marked
        UNION ALL
        SELECT 2, id, 'stop_requested', jsonb_build_object('reason', end_reason)
          FROM marked WHERE status = 'stopping'
    ) AS e ORDER BY n
),
queued AS (
    INSERT INTO event_outbox (event_id, routing_key, body, traceparent, created_at)
    SELECT :event_id, :routing_key, :body, :traceparent, now() FROM marked
)
SELECT status, end_reason FROM marked
"""
).bindparams(
    bindparam("livekit_token_expires_at", type_=UTCDateTime()),
    bindparam("expires_at", type_=UTCDateTime()),
    bindparam("request_payload", type_=JSONDocument),
    bindparam("body", type_=JSONDocument),
)


def start_state(
    db: Database, ticket: StartTicket, vendor_session_id: str
) -> StopTicket | NotRecorded | None:
    """Where the row of an attempt stands, read afresh (after a write whose outcome is unknown,
    e.g. a lost commit reply): None if it holds ``vendor_session_id`` (recorded), a StopTicket
    if it holds it and a stop is owed, else why it does not."""
    with db.transaction() as session:
        row = session.get(SessionRow, ticket.session_id)
        if row is None:
            return NotRecorded.GONE
        if row.vendor_session_id == vendor_session_id:
            if row.status != S.STOPPING:
                return None
            return StopTicket(
                row.id,
                row.request_id,
                vendor_session_id,
                row.end_reason or USER_CLOSED,
                row.traceparent,
                row.expires_at,
            )
        if (
            row.status == S.STARTING
            and row.vendor_session_id is None
            and row.attempt_owner == ticket.owner
        ):
            return NotRecorded.PENDING
        return NotRecorded.MOVED_ON


def record_failed(
    db: Database, ticket: StartTicket, *, error_code: str, error_message: str
) -> bool:
    """``starting`` → ``failed`` for this attempt; False if the row had moved on (another
    attempt holds it, or it ended)."""
    with db.transaction() as session:
        row = _lock_row(session, ticket.session_id)
        if (
            row is None
            or row.status != S.STARTING
            or row.vendor_session_id is not None
            or row.attempt_owner != ticket.owner
        ):
            return False
        row.error_code = error_code
        row.error_message = error_message
        _finish(session, row, S.FAILED, db_now(session))
        return True


def back_to_waiting(db: Database, ticket: StartTicket, *, vendor_error: str) -> bool:
    """The vendor said the account is at its limit: wait again (first in line, by age)."""
    with db.transaction() as session:
        row = _lock_row(session, ticket.session_id)
        if (
            row is None
            or row.status != S.STARTING
            or row.vendor_session_id is not None
            or row.attempt_owner != ticket.owner
        ):
            return False
        if row.stop_requested_at is not None:
            _finish(
                session, row, S.ENDED, db_now(session), end_reason=row.end_reason or USER_CLOSED
            )
            return True
        row.status = S.WAITING.value
        row.attempt_owner = None
        row.attempt_lease_until = None
        row.admitted_at = None
        events.log(session, EventKind.BACK_TO_WAITING, row=row, vendor_error=vendor_error)
        return True


def _finish(
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
        signal_after_commit(session, SLOT_FREED)
    row.status = status.value
    row.ended_at = now
    if end_reason is not None:
        row.end_reason = end_reason
    row.livekit_token = None
    row.stop_retry_at = None
    row.attempt_lease_until = None
    row.request_payload = without_secrets(row.request_payload)
    session.flush()
    events.log(
        session,
        EventKind.ENDED if status == S.ENDED else EventKind.FAILED,
        row=row,
        end_reason=row.end_reason,
        error_code=row.error_code,
        **detail,
    )
    events.emit(session, row)


# -- stops -----------------------------------------------------------------------------------


def _to_stopping(
    session: Session, row: SessionRow, reason: str, now: datetime, retry_in: float
) -> StopTicket:
    assert row.vendor_session_id is not None
    row.status = S.STOPPING.value
    row.end_reason = reason
    row.stop_requested_at = row.stop_requested_at or now
    row.stop_retry_at = now + timedelta(seconds=retry_in)
    events.log(session, EventKind.STOP_REQUESTED, row=row, reason=reason)
    return StopTicket(
        row.id, row.request_id, row.vendor_session_id, reason, row.traceparent, row.expires_at
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
    it is remembered, under the admission lock so that no claim can slip in between the look
    for a row and the memo, and the claim of that start finds it.
    """
    with db.transaction() as session:
        query = select(SessionRow).with_for_update()
        if request_id is not None:
            query = query.where(SessionRow.request_id == request_id)
        else:
            query = query.where(SessionRow.vendor_session_id == vendor_session_id)
        row = session.scalars(query).one_or_none()
        if row is None and request_id is not None:
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADMISSION_LOCK_KEY})
            row = session.scalars(query).one_or_none()  # a claim may have committed meanwhile
            if row is None:
                session.execute(
                    postgresql.insert(EarlyStop)
                    .values(request_id=request_id, reason=reason)
                    .on_conflict_do_nothing(index_elements=["request_id"])
                )
                events.log(
                    session, EventKind.STOP_BEFORE_START, request_id=request_id, reason=reason
                )
                return StopRequestResult(False, None, None, remembered=True)
        if row is None:
            return StopRequestResult(False, None, None)
        before = row.status
        now = db_now(session)
        if row.status == S.WAITING:
            _finish(session, row, S.ENDED, now, end_reason=reason)
        elif row.status == S.STARTING and row.stop_requested_at is None:
            row.stop_requested_at = now
            row.end_reason = reason
            events.log(
                session, EventKind.STOP_REQUESTED, row=row, reason=reason, while_status=before
            )
        elif row.status == S.ACTIVE:
            return StopRequestResult(
                True, before, _to_stopping(session, row, reason, now, retry_in)
            )
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


_FINISH_STOPPED = (
    _SESSIONS.update()
    .where(
        _SESSIONS.c.id.in_(bindparam("ids", expanding=True)),
        _SESSIONS.c.status == S.STOPPING.value,
    )
    .values(status=S.ENDED.value, ended_at=func.now(), livekit_token=None, stop_retry_at=None)
    .returning(
        _SESSIONS.c.id,
        _SESSIONS.c.request_id,
        _SESSIONS.c.vendor_session_id,
        _SESSIONS.c.end_reason,
        _SESSIONS.c.expires_at,
        _SESSIONS.c.ended_at,
        _SESSIONS.c.traceparent,
    )
)


@dataclass(frozen=True)
class Ended:
    session_id: uuid.UUID
    end_reason: str | None
    lag_seconds: float | None  # ended_at - expires_at, by the database's clock


def finish_stops(db: Database, outcomes: dict[uuid.UUID, str]) -> list[Ended]:
    """``stopping`` → ``ended`` for the rows whose vendor stop was confirmed (or that the vendor
    said were already gone): ``outcomes`` maps row id → vendor outcome. One transaction for a
    whole sweep batch; returns the rows that were still ``stopping`` (now ``ended``).

    ``_finish`` for the common case as Core statements: a ``stopping`` row came from
    ``active``, whose start already cleared the payload's secrets.
    """
    if not outcomes:
        return []
    with db.transaction() as session:
        ended = session.connection().execute(_FINISH_STOPPED, {"ids": list(outcomes)}).all()
        entries = [
            events.Entry(
                r.id,
                r.vendor_session_id,
                {"end_reason": r.end_reason, "error_code": None, "vendor_outcome": outcomes[r.id]},
            )
            for r in ended
        ]
        events.log_now(session, EventKind.ENDED, entries)
        updates = [
            events.Update(
                S.ENDED.value,
                r.request_id,
                r.vendor_session_id,
                r.expires_at,
                r.traceparent,
                {"end_reason": r.end_reason},
            )
            for r in ended
        ]
        events.emit_now(session, updates)
        if ended:
            signal_after_commit(session, SLOT_FREED)
    return [
        Ended(
            r.id,
            r.end_reason,
            (r.ended_at - r.expires_at).total_seconds() if r.expires_at else None,
        )
        for r in ended
    ]


def stop_failed(
    db: Database, session_id: uuid.UUID, *, error: str, base_delay: float, max_delay: float
) -> None:
    """Keep the row ``stopping``; the reaper tries again after a jittered, capped backoff."""
    with db.transaction() as session:
        row = _lock_row(session, session_id)
        if row is None or row.status != S.STOPPING:
            return
        row.stop_attempts += 1
        delay = min(max_delay, base_delay * 2 ** (row.stop_attempts - 1))
        row.stop_retry_at = db_now(session) + timedelta(seconds=delay * random.uniform(0.5, 1.0))
        events.log(
            session, EventKind.STOP_ATTEMPT_FAILED, row=row, attempt=row.stop_attempts, error=error
        )


# -- the reaper ------------------------------------------------------------------------------

_CLAIM_EXPIRED = (
    _SESSIONS.update()
    .where(
        _SESSIONS.c.id.in_(
            select(_SESSIONS.c.id)
            .where(_SESSIONS.c.status == S.ACTIVE.value, _SESSIONS.c.expires_at <= func.now())
            .order_by(_SESSIONS.c.expires_at)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
    )
    .values(
        status=S.STOPPING.value,
        end_reason=MAX_DURATION_REACHED,
        stop_requested_at=func.coalesce(_SESSIONS.c.stop_requested_at, func.now()),
        stop_retry_at=func.now() + bindparam("retry_in", type_=Interval()),
    )
    .returning(
        _SESSIONS.c.id,
        _SESSIONS.c.request_id,
        _SESSIONS.c.vendor_session_id,
        _SESSIONS.c.traceparent,
        _SESSIONS.c.expires_at,
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
            StopTicket(r.id, r.request_id, r.vendor_session_id, reason, r.traceparent, r.expires_at)
            for r in expired
        ]
        events.log_now(
            session,
            EventKind.STOP_REQUESTED,
            [events.Entry(r.id, r.vendor_session_id, {"reason": reason}) for r in expired],
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
                    row.id,
                    row.request_id,
                    row.vendor_session_id,
                    row.end_reason or "ERROR",
                    row.traceparent,
                    row.expires_at,
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


# -- the reconciler --------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveVendorRow:
    session_id: uuid.UUID
    vendor_session_id: str
    started_at: datetime | None
    traceparent: str | None


def database_time(db: Database) -> datetime:
    with db.transaction() as session:
        return db_now(session)


def live_vendor_rows(db: Database) -> list[LiveVendorRow]:
    """Every row we believe the vendor runs (``active`` or ``stopping``)."""
    with db.transaction() as session:
        rows = session.execute(
            select(
                SessionRow.id,
                SessionRow.vendor_session_id,
                SessionRow.started_at,
                SessionRow.traceparent,
            ).where(
                SessionRow.status.in_([S.ACTIVE.value, S.STOPPING.value]),
                SessionRow.vendor_session_id.is_not(None),
            )
        ).all()
    return [LiveVendorRow(r.id, r.vendor_session_id, r.started_at, r.traceparent) for r in rows]


def owned_vendor_ids(
    db: Database, vendor_session_ids: Sequence[str], *, ended_after: datetime
) -> set[str]:
    """The ids a row still owns: live rows, and rows that ended so recently that a vendor list
    fetched a moment ago may still show them. A session listed active whose row ended long ago
    is billing for nothing, and is treated as an orphan."""
    if not vendor_session_ids:
        return set()
    with db.transaction() as session:
        found = session.scalars(
            select(SessionRow.vendor_session_id).where(
                SessionRow.vendor_session_id.in_(list(vendor_session_ids)),
                (SessionRow.ended_at.is_(None)) | (SessionRow.ended_at > ended_after),
            )
        ).all()
    return {v for v in found if v is not None}


def record_vendor_ended(
    db: Database, session_id: uuid.UUID, *, end_reason: str, ended_at: datetime | None
) -> bool:
    """The vendor ended a session on its own (idle, error): ``ended`` with the vendor's reason."""
    with db.transaction() as session:
        row = _lock_row(session, session_id)
        if row is None or row.status not in (S.ACTIVE, S.STOPPING):
            return False
        reason = row.end_reason if row.status == S.STOPPING and row.end_reason else end_reason
        _finish(
            session,
            row,
            S.ENDED,
            ended_at or db_now(session),
            end_reason=reason,
            source="reconciler",
        )
        return True


@dataclass(frozen=True)
class StuckStarts:
    failed: list[str]  # request ids failed START_TIMEOUT
    redispatch: list[tuple[uuid.UUID, str]]  # (row id, claim id) to dispatch again


def resolve_stuck_starts(db: Database, *, start_timeout: float) -> StuckStarts:
    """``starting`` rows nobody is starting: an attempt whose lease ran out (its worker died,
    or the vendor never answered) fails ``START_TIMEOUT``; a row admitted longer than the start
    timeout ago with no attempt since (its dispatch was lost) is dispatched again."""
    failed: list[str] = []
    redispatch: list[tuple[uuid.UUID, str]] = []
    with db.transaction() as session:
        now = db_now(session)
        rows = session.scalars(
            select(SessionRow)
            .where(
                SessionRow.status == S.STARTING.value,
                SessionRow.vendor_session_id.is_(None),
                SessionRow.attempt_lease_until.is_(None) | (SessionRow.attempt_lease_until < now),
            )
            .with_for_update(skip_locked=True)
        ).all()
        cutoff = now - timedelta(seconds=start_timeout)
        grace = now - timedelta(seconds=LEASE_GRACE_SECONDS)
        for row in rows:
            if row.attempt_owner is not None:
                if row.attempt_lease_until is not None and row.attempt_lease_until > grace:
                    continue
                row.error_code = "START_TIMEOUT"
                row.error_message = (
                    "no vendor answer recorded within ORCHESTRATOR_START_TIMEOUT_SECONDS"
                )
                _finish(session, row, S.FAILED, now)
                failed.append(row.request_id)
            elif (row.admitted_at or row.start_sent_at or row.created_at) < cutoff:
                assert row.claim_id is not None
                row.admitted_at = now
                events.log(session, EventKind.REDISPATCHED, row=row)
                redispatch.append((row.id, row.claim_id))
    return StuckStarts(failed, redispatch)


def log_orphan_stop(
    db: Database, vendor_session_id: str, *, outcome: str, created_at: str | None
) -> None:
    with db.transaction() as session:
        events.log(
            session,
            EventKind.ORPHAN_STOPPED,
            vendor_session_id=vendor_session_id,
            reason="ZOMBIE_SESSION_REAP",
            vendor_outcome=outcome,
            vendor_created_at=created_at,
        )


_LEASES: Table = SweepLease.__table__  # type: ignore[assignment]


def take_sweep_lease(
    db: Database, name: str, owner: str, *, seconds: float, spacing: float
) -> bool:
    """Take the deployment-wide lease for sweep ``name`` unless another holder's is live or a
    sweep finished less than ``spacing`` seconds ago (a backlog of sweep messages then costs
    nothing)."""
    table = _LEASES
    statement = (
        postgresql.insert(SweepLease)
        .values(name=name, owner=owner, lease_until=func.now() + timedelta(seconds=seconds))
        .on_conflict_do_update(
            index_elements=["name"],
            set_={"owner": owner, "lease_until": func.now() + timedelta(seconds=seconds)},
            where=(
                (table.c.lease_until.is_(None) | (table.c.lease_until < func.now()))
                & (
                    table.c.finished_at.is_(None)
                    | (table.c.finished_at < func.now() - timedelta(seconds=spacing))
                )
            ),
        )
        .returning(SweepLease.owner)
    )
    with db.transaction() as session:
        return session.execute(statement).scalar_one_or_none() == owner


def release_sweep_lease(db: Database, name: str, owner: str) -> None:
    with db.transaction() as session:
        lease = session.get(SweepLease, name, with_for_update=True)
        if lease is not None and lease.owner == owner:
            lease.lease_until = None
            lease.finished_at = db_now(session)


# -- admission -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdmissionState:
    """What one admission decision needs; the counts stop early because they run under the
    global lock: ``live`` is counted up to ``cap``, ``waiting`` up to 1 (does anyone wait?)."""

    cap: int
    live: int
    waiting: int

    @property
    def free(self) -> int:
        return max(0, self.cap - self.live)


_ADMISSION_STATE = text("SELECT cap, live, waiting FROM orchestrator_admission_state(:cap)")


def _admission_state(session: Session, configured_cap: int) -> AdmissionState:
    """Counted under one lock, so no two workers hand out the same free slot. The effective
    cap is the lower of ours and the vendor's last reported limit (migration 0003)."""
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADMISSION_LOCK_KEY})
    found = session.execute(_ADMISSION_STATE, {"cap": configured_cap}).one()
    return AdmissionState(found.cap, found.live, found.waiting)


def admission_state(db: Database, configured_cap: int) -> AdmissionState:
    with db.transaction() as session:
        return _admission_state(session, configured_cap)


def admit(db: Database, *, configured_cap: int) -> list[tuple[uuid.UUID, str]]:
    """Move the oldest ``waiting`` rows into the free slots; (row id, new claim id) each."""
    admitted: list[tuple[uuid.UUID, str]] = []
    with db.transaction() as session:
        state = _admission_state(session, configured_cap)
        if state.free == 0 or state.waiting == 0:
            return admitted
        now = db_now(session)
        rows = session.scalars(
            select(SessionRow)
            .where(SessionRow.status == S.WAITING.value)
            .order_by(SessionRow.created_at, SessionRow.id)
            .limit(state.free)
            .with_for_update()
        ).all()
        for row in rows:
            row.status = S.STARTING.value
            row.claim_id = f"admit-{uuid.uuid4()}"
            row.admitted_at = now
            row.attempt_owner = None
            row.attempt_lease_until = None
            waited = (now - row.created_at).total_seconds()
            events.log(session, EventKind.ADMITTED, row=row, waited_seconds=round(waited, 3))
            admitted.append((row.id, row.claim_id))
    return admitted


def expire_waiting(db: Database) -> list[str]:
    """``waiting`` rows past their ``start_deadline_at`` → ``failed`` ``CAPACITY_TIMEOUT``."""
    expired: list[str] = []
    with db.transaction() as session:
        now = db_now(session)
        rows = session.scalars(
            select(SessionRow)
            .where(SessionRow.status == S.WAITING.value, SessionRow.start_deadline_at <= now)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            row.error_code = "CAPACITY_TIMEOUT"
            row.error_message = "no free session slot before start_deadline_seconds passed"
            _finish(session, row, S.FAILED, now)
            expired.append(row.request_id)
    return expired


def has_waiting(db: Database) -> bool:
    with db.transaction() as session:
        return (
            session.scalar(
                select(SessionRow.id).where(SessionRow.status == S.WAITING.value).limit(1)
            )
            is not None
        )


def log_compensation(db: Database, request_id: str, vendor_session_id: str, *, why: str) -> None:
    """Record a vendor session stopped again because no row could own it."""
    with db.transaction() as session:
        row = session.scalars(
            select(SessionRow).where(SessionRow.request_id == request_id)
        ).one_or_none()
        events.log(
            session,
            EventKind.COMPENSATED,
            row=row,
            vendor_session_id=vendor_session_id,
            request_id=request_id,
            why=why,
        )
