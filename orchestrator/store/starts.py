"""The vendor start of a claimed row: an attempt (with its lease), its answer recorded or
its failure (requests that cannot be started at all: :mod:`.invalid`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from orchestrator.contract import without_secrets
from orchestrator.db import AfterCommit, Database, EventKind, SessionRow
from orchestrator.db.types import JSONDocument, UTCDateTime
from orchestrator.events import bodies
from orchestrator.store import history
from orchestrator.store.ending import end_row
from orchestrator.store.rows import (
    DEFAULT_ACCOUNT,
    USER_CLOSED,
    S,
    StopTicket,
    db_now,
    lock_row,
    new_attempt_owner,
)


@dataclass(frozen=True, kw_only=True)
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
    account: str | None = DEFAULT_ACCOUNT  # whose key starts it (docs/admission.md)


@dataclass(frozen=True)
class NoStart:
    """This claim has no vendor start to make: ``status`` is the row's (``gone``: no row)."""

    status: str


@dataclass(frozen=True)
class AttemptBusy:
    """Another delivery of this start holds the attempt's lease for ``seconds`` more."""

    seconds: float


def begin_attempt(
    db: Database,
    session_id: uuid.UUID,
    claim_id: str,
    *,
    lease_seconds: float,
    abandoned_attempt: str | None = None,
) -> StartTicket | AttemptBusy | NoStart:
    """Count a vendor start attempt and take its lease. AttemptBusy if another delivery holds
    a live lease (``abandoned_attempt``, an attempt this message itself gave up on, does not
    count); NoStart (with the row's status) if this claim has no start to make.

    A stop that arrived before any vendor call ends the row here, with no call at all.
    """
    with db.transaction() as session:
        row = lock_row(session, session_id)
        if row is None:
            return NoStart("gone")
        if row.vendor_session_id is not None or row.claim_id != claim_id:
            return NoStart(row.status)
        now = db_now(session)
        if row.stop_requested_at is not None and row.status in (S.WAITING, S.STARTING):
            end_row(session, row, S.ENDED, end_reason=row.end_reason or USER_CLOSED)
            return NoStart(row.status)
        if row.status != S.STARTING:
            return NoStart(row.status)
        lease = row.attempt_lease_until
        if lease is not None and lease > now and row.attempt_owner != abandoned_attempt:
            return AttemptBusy((lease - now).total_seconds())
        owner = new_attempt_owner()
        row.attempts += 1
        row.start_sent_at = now
        row.attempt_owner = owner
        row.attempt_lease_until = now + timedelta(seconds=lease_seconds)
        history.log(session, EventKind.START_ATTEMPT, row=row, attempt=row.attempts)
        return StartTicket(
            session_id=row.id,
            request_id=row.request_id,
            payload=dict(row.request_payload),
            attempt=row.attempts,
            sent_at=now,
            created_at=row.created_at,
            traceparent=row.traceparent,
            owner=owner,
            account=row.account,
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


COMPENSATED = "ERROR"  # the reason a compensating stop gives the vendor


class Recorded(Enum):
    """The write landed (``record_started``: the row is ``active``)."""

    YES = "recorded"


class Proceed(Enum):
    """``end_if_stopped``: no stop came, make the vendor call."""

    CALL_VENDOR = "call the vendor"


class NotRecorded(Enum):
    """Why ``record_started`` wrote nothing."""

    GONE = "gone"  # no row at all (lost in a crash of the database): claim the request again
    MOVED_ON = "moved on"  # the row no longer wants this vendor session: stop it again
    PENDING = "pending"  # the row still waits for this attempt's answer: write it again


def record_started(
    db: Database, ticket: StartTicket, start: VendorStart, *, stop_retry_in: float
) -> Recorded | StopTicket | NotRecorded:
    """Store the vendor's answer. Returns Recorded.YES (the row is ``active``), a StopTicket if
    a stop was requested meanwhile (the caller owes the vendor stop, within ``stop_retry_in``:
    the stop's lease, ``STOP_RETRY_SECONDS``, before the reaper may try it again), or why
    nothing was written.

    The hot path of every start: one autocommitted statement (the conditional UPDATE that
    guards the transition — still ``starting``, no vendor session yet, this attempt's lease —,
    the ``active`` event, the outbox row, and the move to ``stopping`` if a stop was requested
    meanwhile), so no transaction waits on this process.
    """
    event_id = uuid.uuid4()
    body = bodies.body_for(
        event_id,
        None,  # occurred_at: the statement's now(), as every time of the row
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
                "stop_retry_in": timedelta(seconds=stop_retry_in),
                "event_id": event_id,
                "routing_key": bodies.routing_key(S.ACTIVE.value),
                "body": body,
                "traceparent": ticket.traceparent,
            },
        ).one_or_none()
    if marked is None:
        # Nothing matched: find out why (or that an earlier write, whose reply was lost,
        # recorded this very session already).
        state = start_state(db, ticket, start.vendor_session_id)
        if not isinstance(state, NotRecorded):
            db.fire(AfterCommit.EVENTS_PENDING)
        return state
    db.fire(AfterCommit.EVENTS_PENDING)
    if marked.status != S.STOPPING:
        return Recorded.YES
    return StopTicket(
        session_id=ticket.session_id,
        request_id=ticket.request_id,
        vendor_session_id=start.vendor_session_id,
        reason=marked.end_reason,
        traceparent=ticket.traceparent,
        expires_at=start.expires_at,
        account=ticket.account,
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
    SELECT :event_id, :routing_key,
           jsonb_set(:body, '{occurred_at}', to_jsonb(OCCURRED_AT)), :traceparent, now()
      FROM marked
)
SELECT status, end_reason FROM marked
""".replace("OCCURRED_AT", bodies.DATABASE_NOW_ISO)
).bindparams(
    bindparam("livekit_token_expires_at", type_=UTCDateTime()),
    bindparam("expires_at", type_=UTCDateTime()),
    bindparam("request_payload", type_=JSONDocument),
    bindparam("body", type_=JSONDocument),
)


def start_state(
    db: Database, ticket: StartTicket, vendor_session_id: str
) -> Recorded | StopTicket | NotRecorded:
    """Where the row of an attempt stands, read afresh (after a write whose outcome is unknown,
    e.g. a lost commit reply): Recorded.YES if it holds ``vendor_session_id``, a StopTicket
    if it holds it and a stop is owed, else why it does not."""
    with db.transaction() as session:
        row = session.get(SessionRow, ticket.session_id)
        if row is None:
            return NotRecorded.GONE
        if row.vendor_session_id == vendor_session_id:
            if row.status != S.STOPPING:
                return Recorded.YES
            return StopTicket(
                session_id=row.id,
                request_id=row.request_id,
                vendor_session_id=vendor_session_id,
                reason=row.end_reason or USER_CLOSED,
                traceparent=row.traceparent,
                expires_at=row.expires_at,
                account=row.account,
            )
        if (
            row.status == S.STARTING
            and row.vendor_session_id is None
            and row.attempt_owner == ticket.owner
        ):
            return NotRecorded.PENDING
        return NotRecorded.MOVED_ON


def lock_own_attempt(session: Session, ticket: StartTicket) -> SessionRow | NotRecorded:
    """The row, locked, if it still waits for this very attempt's answer; else why not."""
    row = lock_row(session, ticket.session_id)
    if row is None:
        return NotRecorded.GONE
    if (
        row.status != S.STARTING
        or row.vendor_session_id is not None
        or row.attempt_owner != ticket.owner
    ):
        return NotRecorded.MOVED_ON
    return row


_STOP_REQUESTED = text("SELECT stop_requested_at IS NOT NULL FROM sessions WHERE id = :id")


def end_if_stopped(db: Database, ticket: StartTicket) -> Proceed | NoStart | NotRecorded:
    """Just before the vendor call: a stop that came after the claim ends the row here, with
    no call at all. NoStart with the row's status if it was ended, MOVED_ON if it had moved on,
    GONE if the claim was lost in a crash of the database, Proceed if the call should go
    ahead.

    One primary-key read on the hot path; the row is locked only when a stop is there."""
    with db.autocommit() as connection:
        stopped = connection.execute(_STOP_REQUESTED, {"id": ticket.session_id}).scalar()
    if stopped is None:
        return NotRecorded.GONE
    if not stopped:
        return Proceed.CALL_VENDOR
    with db.transaction() as session:
        row = lock_own_attempt(session, ticket)
        if isinstance(row, NotRecorded):
            return row
        end_row(session, row, S.ENDED, end_reason=row.end_reason or USER_CLOSED)
        return NoStart(row.status)


def record_failed(
    db: Database,
    ticket: StartTicket,
    *,
    error_code: str,
    error_message: str,
    uncertain: bool = False,
) -> Recorded | NotRecorded:
    """``starting`` → ``failed`` for this attempt; Recorded.YES once written, else why not: MOVED_ON
    (another attempt holds the row, or it ended), GONE (the claim was lost in a crash of the
    database: the caller must not acknowledge the message)."""
    with db.transaction() as session:
        row = lock_own_attempt(session, ticket)
        if isinstance(row, NotRecorded):
            return row
        if uncertain:  # the attempt may have made a session on the row's account
            row.uncertain_at = db_now(session)
        end_row(session, row, S.FAILED, error_code=error_code, error_message=error_message)
        return Recorded.YES


def end_if_holding(db: Database, session_id: uuid.UUID, vendor_session_id: str) -> bool:
    """A vendor session was stopped again because its record seemed to fail: if the record
    landed after all (its commit reply was lost), the row is ``active`` (or ``stopping``) for
    a session that no longer runs. End it (``ERROR``, the compensation's reason); True if so."""
    with db.transaction() as session:
        row = lock_row(session, session_id)
        if (
            row is None
            or row.vendor_session_id != vendor_session_id
            or row.status not in (S.ACTIVE, S.STOPPING)
        ):
            return False
        reason = row.end_reason if row.status == S.STOPPING and row.end_reason else COMPENSATED
        end_row(session, row, S.ENDED, end_reason=reason, record_reply_lost=True)
        return True


def log_compensation(db: Database, request_id: str, vendor_session_id: str, *, why: str) -> None:
    """Record a vendor session stopped again because no row could own it."""
    with db.transaction() as session:
        row = session.scalars(
            select(SessionRow).where(SessionRow.request_id == request_id)
        ).one_or_none()
        history.log(
            session,
            EventKind.COMPENSATED,
            row=row,
            vendor_session_id=vendor_session_id,
            request_id=request_id,
            why=why,
        )
