"""Every state change of a session row: one short transaction each, guarded by a row lock
(``SELECT … FOR UPDATE``)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import Table, bindparam, func, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from orchestrator.db import LIVE_STATUSES, Database, EventKind, SessionRow, SessionStatus
from orchestrator.db.engine import signal_after_commit
from orchestrator.db.types import JSONDocument, UTCDateTime, utcnow
from orchestrator.lifecycle import events
from orchestrator.lifecycle.requests import storable, without_secrets

S = SessionStatus
SLOT_FREED = "slot_freed"
MAX_DURATION_REACHED = "MAX_DURATION_REACHED"  # the reaper's end_reason (vendor vocabulary)
ADMISSION_LOCK_KEY = 0x5E5511  # pg_advisory_xact_lock: one admission decision at a time
LIVE_VALUES = [s.value for s in LIVE_STATUSES]


class ClaimOutcome(Enum):
    NEW = "new"  # this message created the row
    RESUME = "resume"  # the same message again (redelivery): carry on from the row's state
    DUPLICATE = "duplicate"  # another message with the same request_id and payload
    CONFLICT = "conflict"  # same request_id, different payload: ignored, recorded


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    session_id: uuid.UUID
    status: str
    ticket: StartTicket | None = None  # a new row admitted at once: its first attempt counted


@dataclass(frozen=True)
class StartTicket:
    """What a worker needs to call the vendor, read in the transaction that claimed the attempt."""

    session_id: uuid.UUID
    request_id: str
    payload: dict[str, Any]
    attempt: int
    sent_at: datetime
    created_at: datetime
    traceparent: str | None


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


def _insert_ignoring_conflict(db: Database, values: dict[str, Any]) -> Any:
    return (
        postgresql.insert(SessionRow)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(SessionRow.id)
    )


def claim(
    db: Database,
    *,
    request_id: str,
    claim_id: str,
    payload: dict[str, Any],
    digest: str,
    avatar_id: str,
    metadata: dict[str, Any] | None,
    max_duration_seconds: int | None,
    start_deadline_at: datetime | None,
    traceparent: str | None,
    max_concurrent_sessions: int,
) -> Claim:
    """Create the row for ``request_id`` — ``starting`` if a slot is free and nobody waits,
    else ``waiting`` — or say why this message finds one already."""
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "request_id": request_id,
        "claim_id": claim_id,
        "avatar_id": avatar_id,
        "payload": payload,
        "digest": digest,
        "metadata": metadata,
        "max_duration_seconds": max_duration_seconds,
        "start_deadline_at": start_deadline_at,
        "traceparent": traceparent,
        "now": utcnow(),
        "configured_cap": max_concurrent_sessions,
    }
    created = _claim_new_row_postgres(db, values)
    if created is not None:
        new_id, status, admission = created
        if status == S.WAITING and admission.free > 0:
            db.signal(SLOT_FREED)  # others wait while slots are free: admit them FIFO
        if status == S.WAITING:
            return Claim(ClaimOutcome.NEW, new_id, status.value)
        now = values["now"]
        ticket = StartTicket(new_id, request_id, payload, 1, now, now, traceparent)
        return Claim(ClaimOutcome.NEW, new_id, status.value, ticket)
    with db.transaction() as session:
        row = session.scalars(
            select(SessionRow).where(SessionRow.request_id == request_id).with_for_update()
        ).one()
        if row.claim_id == claim_id:
            return Claim(ClaimOutcome.RESUME, row.id, row.status)
        if row.payload_sha256 == digest:
            events.log(session, EventKind.DUPLICATE, row=row, claim_id=claim_id)
            return Claim(ClaimOutcome.DUPLICATE, row.id, row.status)
        events.log(
            session,
            EventKind.DUPLICATE_CONFLICT,
            row=row,
            claim_id=claim_id,
            note="same request_id with a different payload; the repeat was ignored",
        )
        return Claim(ClaimOutcome.CONFLICT, row.id, row.status)


NewRow = tuple[uuid.UUID, SessionStatus, "AdmissionState"]

_CLAIM_POSTGRES = text(
    "SELECT session_id, status, cap, live, waiting FROM orchestrator_claim("
    ":id, :request_id, :claim_id, :avatar_id, :payload, :digest, :metadata,"
    " :max_duration_seconds, :start_deadline_at, :traceparent, :now, :configured_cap)"
).bindparams(
    bindparam("payload", type_=JSONDocument),
    bindparam("metadata", type_=JSONDocument),
    bindparam("start_deadline_at", type_=UTCDateTime()),
    bindparam("now", type_=UTCDateTime()),
)


def _claim_new_row_postgres(db: Database, values: dict[str, Any]) -> NewRow | None:
    """The admission decision, the insert and its ``created`` event in one autocommitted
    statement (migration 0003): the admission lock is held only while the server runs it."""
    with db.autocommit() as connection:
        found = connection.execute(_CLAIM_POSTGRES, values).one()
    if found.session_id is None:
        return None
    admission = AdmissionState(found.cap, found.live, found.waiting)
    return found.session_id, SessionStatus(found.status), admission


def record_invalid(
    db: Database,
    *,
    request_id: str,
    claim_id: str,
    payload: dict[str, Any],
    digest: str,
    message: str,
    traceparent: str | None,
) -> uuid.UUID | None:
    """A message that decoded but breaks the contract becomes a ``failed`` row."""
    payload = storable(payload)
    message = storable(message)
    avatar = payload.get("avatar_id")
    with db.transaction() as session:
        new_id = session.execute(
            _insert_ignoring_conflict(
                db,
                {
                    "id": uuid.uuid4(),
                    "request_id": request_id,
                    "claim_id": claim_id,
                    "status": S.FAILED.value,
                    "avatar_id": avatar if isinstance(avatar, str) else None,
                    "request_payload": without_secrets(payload),
                    "payload_sha256": digest,
                    "error_code": "VALIDATION_ERROR",
                    "error_message": message,
                    "traceparent": traceparent,
                    "created_at": utcnow(),
                    "ended_at": utcnow(),
                },
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
        events.log(session, EventKind.FAILED, row=row, error_code="VALIDATION_ERROR", error=message)
        events.emit(session, row)
        return row.id


def begin_attempt(db: Database, session_id: uuid.UUID, claim_id: str) -> StartTicket | None:
    """Count a vendor start attempt, or None if this row needs no start from this claim.

    A stop that arrived before any vendor call ends the row here, with no call at all.
    """
    with db.transaction() as session:
        row = _lock_row(session, session_id)
        if (
            row is None
            or row.status != S.STARTING
            or row.vendor_session_id is not None
            or row.claim_id != claim_id
        ):
            return None
        now = utcnow()
        if row.stop_requested_at is not None:
            _finish(session, row, S.ENDED, end_reason=row.end_reason or "USER_CLOSED")
            return None
        row.attempts += 1
        row.start_sent_at = now
        events.log(session, EventKind.START_ATTEMPT, row=row, attempt=row.attempts)
        return StartTicket(
            row.id,
            row.request_id,
            dict(row.request_payload),
            row.attempts,
            now,
            row.created_at,
            row.traceparent,
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


def record_started(
    db: Database, ticket: StartTicket, start: VendorStart
) -> StopTicket | bool | None:
    """Store the vendor's answer. Returns False if the row no longer wants this session (the
    caller must stop it: compensation), a StopTicket if a stop was requested meanwhile, else None.

    The hot path of every start: on Postgres one autocommitted statement (the conditional
    UPDATE that guards the transition, the ``active`` event, the outbox row, and the move to
    ``stopping`` if a stop was requested meanwhile), so no transaction waits on this process.
    """
    now = utcnow()
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
            _RECORD_STARTED_POSTGRES,
            {
                "id": ticket.session_id,
                "vendor_session_id": start.vendor_session_id,
                "voice_id": start.voice_id,
                "livekit_url": start.livekit_url,
                "livekit_room": start.livekit_room,
                "livekit_token": start.livekit_token,
                "livekit_token_expires_at": start.livekit_token_expires_at,
                "granted_minutes": start.granted_minutes,
                "max_session_numbers": start.max_session_numbers,
                "now": now,
                "expires_at": start.expires_at,
                "request_payload": without_secrets(ticket.payload),
                "stop_retry_at": now + timedelta(seconds=STOP_RETRY_AFTER_START_SECONDS),
                "event_id": event_id,
                "body": body,
                "traceparent": ticket.traceparent,
            },
        ).one_or_none()
    if marked is None:
        return False
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


STOP_RETRY_AFTER_START_SECONDS = 30.0
_RECORD_STARTED_POSTGRES = text(
    """
WITH marked AS (
    UPDATE sessions SET
        status = CASE WHEN stop_requested_at IS NULL THEN 'active' ELSE 'stopping' END,
        end_reason = CASE WHEN stop_requested_at IS NULL THEN end_reason
                          ELSE coalesce(end_reason, 'USER_CLOSED') END,
        stop_retry_at = CASE WHEN stop_requested_at IS NULL THEN NULL
                             ELSE :stop_retry_at END,
        vendor_session_id = :vendor_session_id,
        voice_id = :voice_id,
        livekit_url = :livekit_url,
        livekit_room = :livekit_room,
        livekit_token = :livekit_token,
        livekit_token_expires_at = :livekit_token_expires_at,
        granted_max_duration_minutes = :granted_minutes,
        max_session_numbers = :max_session_numbers,
        started_at = :now,
        expires_at = :expires_at,
        request_payload = :request_payload
    WHERE id = :id AND status = 'starting' AND vendor_session_id IS NULL
    RETURNING id, attempts, status, end_reason
),
logged AS (
    INSERT INTO session_events (session_id, vendor_session_id, occurred_at, kind, detail)
    SELECT id, :vendor_session_id, :now, kind, detail FROM (
        SELECT 1 AS n, id, 'active' AS kind, jsonb_build_object('attempt', attempts) AS detail
          FROM marked
        UNION ALL
        SELECT 2, id, 'stop_requested', jsonb_build_object('reason', end_reason)
          FROM marked WHERE status = 'stopping'
    ) AS e ORDER BY n
),
queued AS (
    INSERT INTO event_outbox (event_id, routing_key, body, traceparent, created_at)
    SELECT :event_id, 'session.active', :body, :traceparent, :now FROM marked
)
SELECT status, end_reason FROM marked
"""
).bindparams(
    bindparam("livekit_token_expires_at", type_=UTCDateTime()),
    bindparam("now", type_=UTCDateTime()),
    bindparam("expires_at", type_=UTCDateTime()),
    bindparam("stop_retry_at", type_=UTCDateTime()),
    bindparam("request_payload", type_=JSONDocument),
    bindparam("body", type_=JSONDocument),
)


def record_failed(
    db: Database, session_id: uuid.UUID, *, error_code: str, error_message: str
) -> bool:
    """``starting`` → ``failed``; False if the row had already moved on."""
    with db.transaction() as session:
        row = _lock_row(session, session_id)
        if row is None or row.status not in (S.STARTING, S.WAITING):
            return False
        row.error_code = error_code
        row.error_message = error_message
        _finish(session, row, S.FAILED)
        return True


def _finish(
    session: Session,
    row: SessionRow,
    status: SessionStatus,
    *,
    end_reason: str | None = None,
    **detail: Any,
) -> None:
    """The one terminal transition: clears the LiveKit token and the payload's secrets."""
    if row.status in LIVE_VALUES:
        signal_after_commit(session, SLOT_FREED)
    row.status = status.value
    row.ended_at = utcnow()
    if end_reason is not None:
        row.end_reason = end_reason
    row.livekit_token = None
    row.stop_retry_at = None
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


def _to_stopping(
    session: Session, row: SessionRow, reason: str, retry_in: float = 30.0
) -> StopTicket:
    assert row.vendor_session_id is not None
    now = utcnow()
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


def request_stop(
    db: Database,
    *,
    request_id: str | None = None,
    vendor_session_id: str | None = None,
    reason: str,
    retry_in: float = 30.0,
) -> StopRequestResult:
    """Apply a stop request to the row; a ticket means this caller owes the vendor stop."""
    with db.transaction() as session:
        query = select(SessionRow).with_for_update()
        if request_id is not None:
            query = query.where(SessionRow.request_id == request_id)
        else:
            query = query.where(SessionRow.vendor_session_id == vendor_session_id)
        row = session.scalars(query).one_or_none()
        if row is None:
            return StopRequestResult(False, None, None)
        before = row.status
        if row.status == S.WAITING:
            _finish(session, row, S.ENDED, end_reason=reason)
        elif row.status == S.STARTING and row.stop_requested_at is None:
            row.stop_requested_at = utcnow()
            row.end_reason = reason
            events.log(
                session, EventKind.STOP_REQUESTED, row=row, reason=reason, while_status=before
            )
        elif row.status == S.ACTIVE:
            return StopRequestResult(True, before, _to_stopping(session, row, reason, retry_in))
        return StopRequestResult(True, before, None)


_FINISH_STOPPED = (
    _SESSIONS.update()
    .where(
        _SESSIONS.c.id.in_(bindparam("ids", expanding=True)),
        _SESSIONS.c.status == S.STOPPING.value,
    )
    .values(status=S.ENDED.value, ended_at=bindparam("now"), livekit_token=None, stop_retry_at=None)
    .returning(
        _SESSIONS.c.id,
        _SESSIONS.c.request_id,
        _SESSIONS.c.vendor_session_id,
        _SESSIONS.c.end_reason,
        _SESSIONS.c.expires_at,
        _SESSIONS.c.traceparent,
    )
)


def finish_stops(db: Database, outcomes: dict[uuid.UUID, str]) -> set[uuid.UUID]:
    """``stopping`` → ``ended`` for the rows whose vendor stop was confirmed (or that the vendor
    said were already gone): ``outcomes`` maps row id → vendor outcome. One transaction for a
    whole sweep batch; returns the ids that were still ``stopping`` (now ``ended``).

    ``_finish`` for the common case as Core statements: a ``stopping`` row came from
    ``active``, whose start already cleared the payload's secrets.
    """
    if not outcomes:
        return set()
    with db.transaction() as session:
        ended = (
            session.connection()
            .execute(_FINISH_STOPPED, {"ids": list(outcomes), "now": utcnow()})
            .all()
        )
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
    return {r.id for r in ended}


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
        row.stop_retry_at = utcnow() + timedelta(seconds=delay * random.uniform(0.5, 1.0))
        events.log(
            session, EventKind.STOP_ATTEMPT_FAILED, row=row, attempt=row.stop_attempts, error=error
        )


_CLAIM_EXPIRED = (
    _SESSIONS.update()
    .where(
        _SESSIONS.c.id.in_(
            select(_SESSIONS.c.id)
            .where(_SESSIONS.c.status == S.ACTIVE.value, _SESSIONS.c.expires_at <= bindparam("now"))
            .order_by(_SESSIONS.c.expires_at)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
    )
    .values(
        status=S.STOPPING.value,
        end_reason=MAX_DURATION_REACHED,
        stop_requested_at=func.coalesce(_SESSIONS.c.stop_requested_at, bindparam("now")),
        stop_retry_at=bindparam("retry_at"),
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
    now = utcnow()
    retry_at = now + timedelta(seconds=retry_in)
    with db.transaction() as session:
        expired = sorted(
            session.connection()
            .execute(_CLAIM_EXPIRED, {"now": now, "limit": limit, "retry_at": retry_at})
            .all(),
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
            .where(SessionRow.status == S.STOPPING.value, SessionRow.stop_retry_at <= now)
            .order_by(SessionRow.stop_retry_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
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


def expiries_before(db: Database, until: datetime, *, limit: int = 10_000) -> list[datetime]:
    """``expires_at`` of the ``active`` rows that expire from now until ``until``."""
    with db.transaction() as session:
        found = session.scalars(
            select(SessionRow.expires_at)
            .where(
                SessionRow.status == S.ACTIVE.value,
                SessionRow.expires_at > utcnow(),
                SessionRow.expires_at <= until,
            )
            .order_by(SessionRow.expires_at)
            .limit(limit)
        ).all()
    return [e for e in found if e is not None]


@dataclass(frozen=True)
class LiveVendorRow:
    session_id: uuid.UUID
    vendor_session_id: str
    started_at: datetime | None
    traceparent: str | None


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
        _finish(session, row, S.ENDED, end_reason=reason, source="reconciler")
        if ended_at is not None:
            row.ended_at = ended_at
        return True


def fail_stuck_starts(db: Database, *, older_than: datetime) -> list[str]:
    """``starting`` rows with no vendor id whose last attempt began before ``older_than``."""
    failed: list[str] = []
    with db.transaction() as session:
        rows = session.scalars(
            select(SessionRow)
            .where(
                SessionRow.status == S.STARTING.value,
                SessionRow.vendor_session_id.is_(None),
                func.coalesce(SessionRow.start_sent_at, SessionRow.created_at) < older_than,
            )
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            row.error_code = "START_TIMEOUT"
            row.error_message = (
                "no vendor answer recorded within ORCHESTRATOR_START_TIMEOUT_SECONDS"
            )
            _finish(session, row, S.FAILED)
            failed.append(row.request_id)
    return failed


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


def _admission_state(session: Session, db: Database, configured_cap: int) -> AdmissionState:
    """Counted under one lock, so no two workers hand out the same free slot.

    The effective cap is the lower of ours and the vendor's last reported limit. On Postgres
    the count is ``orchestrator_admission_state()`` (migration 0003), which the claim uses too.
    """
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADMISSION_LOCK_KEY})
    found = session.execute(_ADMISSION_STATE_POSTGRES, {"cap": configured_cap}).one()
    return AdmissionState(found.cap, found.live, found.waiting)


_ADMISSION_STATE_POSTGRES = text(
    "SELECT cap, live, waiting FROM orchestrator_admission_state(:cap)"
)


def admission_state(db: Database, configured_cap: int) -> AdmissionState:
    with db.transaction() as session:
        return _admission_state(session, db, configured_cap)


def admit(db: Database, *, configured_cap: int) -> list[tuple[uuid.UUID, str]]:
    """Move the oldest ``waiting`` rows into the free slots; (row id, new claim id) each."""
    admitted: list[tuple[uuid.UUID, str]] = []
    with db.transaction() as session:
        state = _admission_state(session, db, configured_cap)
        if state.free == 0 or state.waiting == 0:
            return admitted
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
            waited = (utcnow() - row.created_at).total_seconds()
            events.log(session, EventKind.ADMITTED, row=row, waited_seconds=round(waited, 3))
            admitted.append((row.id, row.claim_id))
    return admitted


def expire_waiting(db: Database) -> list[str]:
    """``waiting`` rows past their ``start_deadline_at`` → ``failed`` ``CAPACITY_TIMEOUT``."""
    expired: list[str] = []
    with db.transaction() as session:
        rows = session.scalars(
            select(SessionRow)
            .where(SessionRow.status == S.WAITING.value, SessionRow.start_deadline_at <= utcnow())
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            row.error_code = "CAPACITY_TIMEOUT"
            row.error_message = "no free session slot before start_deadline_seconds passed"
            _finish(session, row, S.FAILED)
            expired.append(row.request_id)
    return expired


def back_to_waiting(db: Database, session_id: uuid.UUID, *, vendor_error: str) -> bool:
    """The vendor said the account is at its limit: wait again (first in line, by age)."""
    with db.transaction() as session:
        row = _lock_row(session, session_id)
        if row is None or row.status != S.STARTING or row.vendor_session_id is not None:
            return False
        if row.stop_requested_at is not None:
            _finish(session, row, S.ENDED, end_reason=row.end_reason or "USER_CLOSED")
            return True
        row.status = S.WAITING.value
        events.log(session, EventKind.BACK_TO_WAITING, row=row, vendor_error=vendor_error)
        return True


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
