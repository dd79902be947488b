"""Admission: the claim of a new request (one statement, ``orchestrator_claim``: the request's
lock, then one eligible account's row at a time in rank order, each given up before the next
is locked), the move of waiting rows into an account's free slots, and deadlines of waiting
rows. docs/admission.md is the design.

``orchestrator_claim`` (the version this code calls) is defined by migration
:data:`CLAIM_FUNCTION_MIGRATION`; tests/test_store.py pins its lock keys to
:data:`ADMISSION_LOCK_KEY` and :func:`request_lock_sql`. Per-account counters (``in_use``,
``waiting``) are kept exact by triggers on ``sessions``; nothing here counts live rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import bindparam, null, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from orchestrator.db import AfterCommit, Database, EarlyStop, EventKind, SessionRow
from orchestrator.db.types import JSONDocument
from orchestrator.errors import OrchestratorError
from orchestrator.store import history
from orchestrator.store.ending import end_row
from orchestrator.store.rows import (
    S,
    db_now,
    insert_ignoring_conflict,
    new_attempt_owner,
)
from orchestrator.store.starts import StartTicket

CLAIM_FUNCTION_MIGRATION = "0012"  # defines the orchestrator_claim called
# The previous release's one admission lock. A claim or admission that may use ``default``
# still takes it while releases before accounts may run beside this one (migration 0007).
ADMISSION_LOCK_KEY = 0x5E5511
# A claim waits this long at most for its locks; past it, AdmissionBusy (retried).
ADMISSION_LOCK_WAIT_SECONDS = 5.0
VENDOR_ACCOUNT = "default"  # the account of today's single-account settings
DEFAULT_TENANT = "default"  # the tenant of a start that names none
# A request its tenant's waiting cap refused (docs/admission.md, "Tenants").
TENANT_WAITING_CAP = "TENANT_WAITING_CAP"
LOCK_NOT_AVAILABLE = "55P03"
# A request's labels: None is SQL NULL ("any account"), never the JSON value null.
LABELS = JSONB(none_as_null=True)


def request_lock_sql(request_id_sql: str) -> str:
    """The advisory lock a claim and a stop of one request meet on (docs/admission.md)."""
    return f"pg_advisory_xact_lock(hashtextextended('request:' || {request_id_sql}, 0))"


class AdmissionBusy(OrchestratorError):
    """A claim's locks were not granted within its bound: try the message again."""


class ClaimOutcome(Enum):
    NEW = "new"  # this message created the row
    RESUME = "resume"  # the same message again (redelivery): carry on from the row's state
    DUPLICATE = "duplicate"  # another message with the same request_id and payload
    CONFLICT = "conflict"  # same request_id, different payload: ignored, recorded
    CANCELLED = "cancelled"  # a stop came before the start: recorded as ended
    REFUSED = "refused"  # its tenant's waiting cap refused it: recorded as failed


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    session_id: uuid.UUID
    status: str
    ticket: StartTicket | None = None  # a new row admitted at once: its first attempt counted
    account: str | None = None  # the account it was admitted to (none while it waits)


_CLAIM = text(
    "SELECT session_id, status, account, cap, live, free_elsewhere, cancelled, at, refused"
    " FROM orchestrator_claim("
    ":id, :request_id, :claim_id, :avatar_id, :payload, :digest, :metadata,"
    " :max_duration_seconds, :start_deadline_seconds, :traceparent, CAST(:account AS text),"
    " :labels, CAST(:tenant AS text), :attempt_owner, :lease_seconds, :lock_timeout_ms,"
    " true)"  # keep the slots other tenants' unfilled reservations need
).bindparams(
    bindparam("payload", type_=JSONDocument),
    bindparam("metadata", type_=JSONDocument),
    bindparam("labels", type_=LABELS),
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
    account: str | None = None  # the account the request names (none: any eligible)
    labels: Mapping[str, str] | None = None  # labels every eligible account must carry
    tenant: str = DEFAULT_TENANT  # whose guarantees, maximum and waiting cap apply


def claim(
    db: Database,
    request: ClaimRequest,
    *,
    lease_seconds: float,
    lock_wait_seconds: float = ADMISSION_LOCK_WAIT_SECONDS,
) -> Claim:
    """Create the row for the request — ``starting`` on the eligible open account with the
    most weighted free share (its first attempt counted, its lease taken from when the locks
    were granted) if one has a slot no older waiting request could take, else ``waiting`` —
    or say why this message finds one already. A slot the other tenants' unfilled
    reservations need is not taken. A row that waits is followed, after its commit, by a
    look at the eligible accounts' counters: a slot freed meanwhile admits (no lost
    wake-up). A stop that came first ends the request here, with no vendor call.
    AdmissionBusy if the locks are not granted within ``lock_wait_seconds``."""
    for _ in range(3):
        claimed = _try_claim(db, request, lease_seconds, lock_wait_seconds)
        if claimed is not None:
            return claimed
    # An early stop and its pruning raced this claim three times: let the message retry.
    raise RuntimeError(f"claim of request {request.request_id} did not settle")


def _try_claim(
    db: Database,
    request: ClaimRequest,
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
                "account": request.account,
                "labels": dict(request.labels) if request.labels else None,
                "tenant": request.tenant,
                "attempt_owner": owner,
                "lease_seconds": lease_seconds,
                "lock_timeout_ms": max(1, round(lock_wait_seconds * 1000)),
            },
        ).one()
    if found.cancelled:
        cancelled = _record_cancelled(db, request)
        if cancelled is not None:
            return Claim(ClaimOutcome.CANCELLED, cancelled, S.ENDED.value)
    elif found.refused is not None:
        refused = record_refused(db, request, TENANT_WAITING_CAP, found.refused)
        if refused is not None:
            return Claim(ClaimOutcome.REFUSED, refused, S.FAILED.value)
    elif found.session_id is not None:
        if found.status == S.WAITING:
            # The message is acknowledged on the strength of this claim, which committed
            # without waiting for the disk: make it durable first.
            db.durability_barrier()
            if found.free_elsewhere or _free_slot_for(db, request):
                db.fire(AfterCommit.SLOT_FREED)  # older requests wait while slots are free
            return Claim(ClaimOutcome.NEW, found.session_id, found.status, None, found.account)
        ticket = StartTicket(
            session_id=found.session_id,
            request_id=request.request_id,
            payload=request.payload,
            attempt=1,
            sent_at=found.at,
            created_at=found.at,
            traceparent=request.traceparent,
            owner=owner,
            account=found.account,
        )
        return Claim(ClaimOutcome.NEW, found.session_id, found.status, ticket, found.account)
    return _existing_row(db, request)


# After a claim committed its row ``waiting``: is a slot free on an open account it may use,
# its tenant below its maximum? The claim held one account's row at a time, so a slot may
# have freed on another after the claim looked at it; the freer's own admission ran before
# the row was there (docs/admission.md, "One decision", step 4).
_FREE_SLOT_FOR = text(
    "SELECT EXISTS (SELECT FROM vendor_accounts a"
    "   WHERE a.in_catalog AND a.enabled AND NOT a.draining"
    "     AND (a.circuit_open_until IS NULL OR a.circuit_open_until <= clock_timestamp())"
    "     AND (CAST(:account AS text) IS NULL OR a.name = :account)"
    "     AND (CAST(:labels AS jsonb) IS NULL OR a.labels @> CAST(:labels AS jsonb))"
    "     AND (a.effective_cap IS NULL OR a.in_use < a.effective_cap))"
    " AND NOT EXISTS (SELECT FROM tenants p JOIN tenant_totals u ON u.name = p.name"
    "   WHERE p.name = :tenant AND p.maximum IS NOT NULL AND u.in_use >= p.maximum)"
).bindparams(bindparam("labels", type_=LABELS))


def _free_slot_for(db: Database, request: ClaimRequest) -> bool:
    with db.autocommit() as connection:
        free = connection.execute(
            _FREE_SLOT_FOR,
            {
                "account": request.account,
                "labels": dict(request.labels) if request.labels else None,
                "tenant": request.tenant,
            },
        ).scalar_one()
    return bool(free)


@contextmanager
def _busy_on_lock_timeout() -> Iterator[None]:
    try:
        yield
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise AdmissionBusy("the admission locks were not granted in time") from None
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
        claim = Claim(outcome, row.id, row.status, None, row.account)
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
                _waiting_row(request, now, stop_requested_at=early.requested_at)
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


def _waiting_row(request: ClaimRequest, now: datetime, **extra: object) -> dict[str, Any]:
    """The columns of a ``waiting`` row for ``request``, created ``now`` (an early stop's
    cancelled request and a refused one start from it, then end at once)."""
    return {
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
        "tenant": request.tenant,
        "account": request.account,
        "requested_account": request.account,
        "requested_labels": dict(request.labels) if request.labels else null(),
        **extra,
    }


def record_refused(
    db: Database, request: ClaimRequest, error_code: str, reason: str
) -> uuid.UUID | None:
    """The row of a request refused before admission (its tenant's waiting cap, a tenant it
    may not claim): ``failed`` at once, naming the reason. None if a row was there already."""
    with db.transaction() as session:
        now = db_now(session)
        new_id = session.execute(
            insert_ignoring_conflict(_waiting_row(request, now))
        ).scalar_one_or_none()
        if new_id is None:
            return None
        row = session.get_one(SessionRow, new_id)
        history.log(
            session, EventKind.CREATED, row=row, claim_id=request.claim_id, status="waiting"
        )
        refused_id: uuid.UUID = row.id
        end_row(session, row, S.FAILED, error_code=error_code, error_message=reason)
        return refused_id


@dataclass(frozen=True)
class AdmissionState:
    """One account's admission state, read from its row (O(1), no count of live rows):
    ``cap`` the lower of the given cap and the account's effective cap, ``live`` its exact
    ``in_use``, ``waiting`` the requests waiting bound to it."""

    cap: int
    live: int
    waiting: int

    @property
    def free(self) -> int:
        return max(0, self.cap - self.live)


_ACCOUNT_STATE = text(
    "SELECT effective_cap, in_use, waiting FROM vendor_accounts WHERE name = :account"
)


def lock_admission(session: Session) -> None:
    """Take the previous release's global admission lock until this transaction ends."""
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADMISSION_LOCK_KEY})


def lock_request(session: Session, request_id: str) -> None:
    """Take the lock a claim of ``request_id`` takes first, until this transaction ends."""
    session.execute(text(f"SELECT {request_lock_sql(':r')}"), {"r": request_id})


def _admission_state(
    session: Session, configured_cap: int, account: str = VENDOR_ACCOUNT
) -> AdmissionState:
    found = session.execute(_ACCOUNT_STATE, {"account": account}).one_or_none()
    if found is None:
        return AdmissionState(configured_cap, 0, 0)
    cap = (
        configured_cap if found.effective_cap is None else min(configured_cap, found.effective_cap)
    )
    return AdmissionState(cap, found.in_use, found.waiting)


def admission_state(
    db: Database, configured_cap: int, account: str = VENDOR_ACCOUNT
) -> AdmissionState:
    with db.transaction() as session:
        return _admission_state(session, configured_cap, account)
