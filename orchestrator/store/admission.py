"""Admission: the claim of a new request (one statement, ``orchestrator_claim``, under the
admission lock), the move of waiting rows into free slots, and deadlines of waiting rows.

``orchestrator_claim`` and ``orchestrator_admission_state`` (the versions this code calls) are
defined by migration :data:`CLAIM_FUNCTION_MIGRATION`; tests/test_store.py pins their lock key
and live statuses to :data:`ADMISSION_LOCK_KEY` and :data:`orchestrator.db.LIVE_STATUSES`.
The vendor's last reported limit is one row of ``vendor_accounts`` (:data:`VENDOR_ACCOUNT`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from orchestrator.db import AfterCommit, Database, EarlyStop, EventKind, SessionRow
from orchestrator.db.types import JSONDocument
from orchestrator.errors import OrchestratorError
from orchestrator.store import history
from orchestrator.store.ending import end, end_row
from orchestrator.store.rows import (
    S,
    db_now,
    insert_ignoring_conflict,
    new_attempt_owner,
)
from orchestrator.store.starts import StartTicket

CLAIM_FUNCTION_MIGRATION = "0006"  # defines the orchestrator_claim and admission state called
ADMISSION_LOCK_KEY = 0x5E5511  # pg_advisory_xact_lock: one admission decision at a time
# A claim waits this long at most for the admission lock; past it, AdmissionBusy (retried).
ADMISSION_LOCK_WAIT_SECONDS = 5.0
VENDOR_ACCOUNT = "default"  # the row of vendor_accounts admission reads (one account today)
LOCK_NOT_AVAILABLE = "55P03"


class AdmissionBusy(OrchestratorError):
    """The admission lock was not granted within the claim's bound: try the message again."""


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


_CLAIM = text(
    "SELECT session_id, status, cap, live, waiting, cancelled, at FROM orchestrator_claim("
    ":id, :request_id, :claim_id, :avatar_id, :payload, :digest, :metadata,"
    " :max_duration_seconds, :start_deadline_seconds, :traceparent, :configured_cap,"
    " :attempt_owner, :lease_seconds, :lock_timeout_ms)"
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
    db: Database,
    request: ClaimRequest,
    *,
    max_concurrent_sessions: int,
    lease_seconds: float,
    lock_wait_seconds: float = ADMISSION_LOCK_WAIT_SECONDS,
) -> Claim:
    """Create the row for the request — ``starting`` (its first attempt counted, its lease
    taken from when the admission lock was granted) if a slot is free and nobody waits, else
    ``waiting`` — or say why this message finds one already. A stop that came first ends the
    request here, with no vendor call. AdmissionBusy if the lock is not granted within
    ``lock_wait_seconds``."""
    for _ in range(3):
        claimed = _try_claim(db, request, max_concurrent_sessions, lease_seconds, lock_wait_seconds)
        if claimed is not None:
            return claimed
    # An early stop and its pruning raced this claim three times: let the message retry.
    raise RuntimeError(f"claim of request {request.request_id} did not settle")


def _try_claim(
    db: Database,
    request: ClaimRequest,
    max_concurrent_sessions: int,
    lease_seconds: float,
    lock_wait_seconds: float,
) -> Claim | None:
    owner = new_attempt_owner()
    with db.autocommit() as connection, _busy_on_lock_timeout():
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
                "lock_timeout_ms": max(1, round(lock_wait_seconds * 1000)),
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
                db.fire(AfterCommit.SLOT_FREED)  # others wait while slots are free: admit them FIFO
            return Claim(ClaimOutcome.NEW, found.session_id, found.status)
        ticket = StartTicket(
            session_id=found.session_id,
            request_id=request.request_id,
            payload=request.payload,
            attempt=1,
            sent_at=found.at,
            created_at=found.at,
            traceparent=request.traceparent,
            owner=owner,
        )
        return Claim(ClaimOutcome.NEW, found.session_id, found.status, ticket)
    return _existing_row(db, request)


@contextmanager
def _busy_on_lock_timeout() -> Iterator[None]:
    try:
        yield
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise AdmissionBusy("the admission lock was not granted in time") from None
        raise


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
            history.log(session, EventKind.DUPLICATE, row=row, claim_id=request.claim_id)
            outcome = ClaimOutcome.DUPLICATE
        else:
            history.log(
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
            insert_ignoring_conflict(
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
        history.log(
            session, EventKind.CREATED, row=row, claim_id=request.claim_id, status="waiting"
        )
        end_row(session, row, S.ENDED, end_reason=early.reason, stopped_before_start=True)
        return session_id


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


_ADMISSION_STATE = text(
    "SELECT cap, live, waiting FROM orchestrator_admission_state(:cap, :account)"
)


def lock_admission(session: Session) -> None:
    """Take the admission lock until this transaction ends: no claim decides meanwhile."""
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADMISSION_LOCK_KEY})


def _admission_state(session: Session, configured_cap: int) -> AdmissionState:
    """Counted under one lock, so no two workers hand out the same free slot. The effective
    cap is the lower of ours and the vendor's last reported limit (``vendor_accounts``)."""
    lock_admission(session)
    found = session.execute(
        _ADMISSION_STATE, {"cap": configured_cap, "account": VENDOR_ACCOUNT}
    ).one()
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
            history.log(session, EventKind.ADMITTED, row=row, waited_seconds=round(waited, 3))
            admitted.append((row.id, row.claim_id))
    return admitted


def expire_waiting(db: Database) -> list[str]:
    """``waiting`` rows past their ``start_deadline_at`` → ``failed`` ``CAPACITY_TIMEOUT``."""
    with db.transaction() as session:
        ids = session.scalars(
            select(SessionRow.id)
            .where(SessionRow.status == S.WAITING.value, SessionRow.start_deadline_at <= func.now())
            .with_for_update(skip_locked=True)
        ).all()
        ended = end(
            session,
            ids,
            S.FAILED,
            from_statuses=[S.WAITING],
            error_code="CAPACITY_TIMEOUT",
            error_message="no free session slot before start_deadline_seconds passed",
        )
        return [e.request_id for e in ended]


def has_waiting(db: Database) -> bool:
    with db.transaction() as session:
        return (
            session.scalar(
                select(SessionRow.id).where(SessionRow.status == S.WAITING.value).limit(1)
            )
            is not None
        )
