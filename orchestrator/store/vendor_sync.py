"""What the reconciler reads and changes: rows the vendor runs, sessions it ended, starts
nobody is making any more, orphans, and the deployment-wide lease of a pass."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql

from orchestrator.db import Database, EventKind, SessionEvent, SessionRow, SweepLease
from orchestrator.deepbrain.values import clean_text, is_storable_id
from orchestrator.store import history
from orchestrator.store.ending import end, end_row
from orchestrator.store.rows import S, db_now, lock_row

# A lease that ran out this recently may be about to be taken over by the same message's
# redelivery, which waited for it: the reconciler leaves it that long before failing the row.
LEASE_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class LiveVendorRow:
    session_id: uuid.UUID
    vendor_session_id: str
    started_at: datetime | None
    traceparent: str | None


def database_time(db: Database) -> datetime:
    with db.transaction() as session:
        return db_now(session)


def live_vendor_rows(db: Database, *, account: str | None = None) -> list[LiveVendorRow]:
    """Every row we believe the vendor runs (``active`` or ``stopping``), of one account if
    ``account`` is given."""
    with db.transaction() as session:
        query = select(
            SessionRow.id,
            SessionRow.vendor_session_id,
            SessionRow.started_at,
            SessionRow.traceparent,
        ).where(
            SessionRow.status.in_([S.ACTIVE.value, S.STOPPING.value]),
            SessionRow.vendor_session_id.is_not(None),
        )
        if account is not None:
            query = query.where(SessionRow.account == account)
        rows = session.execute(query).all()
    return [LiveVendorRow(r.id, r.vendor_session_id, r.started_at, r.traceparent) for r in rows]


def storable_id(vendor_session_id: str) -> str:
    """The key ``session_events`` keeps for a vendor session: its id, or for one no column can
    hold as it is (too long, NUL) ``sha256:`` and its digest. Such a session is never ours."""
    if is_storable_id(vendor_session_id):
        return vendor_session_id
    digest = hashlib.sha256(vendor_session_id.encode("utf-8", "surrogatepass")).hexdigest()
    return "sha256:" + digest


def owned_vendor_ids(
    db: Database, vendor_session_ids: Sequence[str], *, ended_after: datetime
) -> set[str]:
    """The ids a row still owns: live rows, and rows that ended so recently that a vendor list
    fetched a moment ago may still show them. A session listed active whose row ended long ago
    is billing for nothing, and is treated as an orphan (so is one whose id no row can hold)."""
    candidates = [v for v in vendor_session_ids if is_storable_id(v)]
    if not candidates:
        return set()
    with db.transaction() as session:
        found = session.scalars(
            select(SessionRow.vendor_session_id).where(
                SessionRow.vendor_session_id.in_(candidates),
                (SessionRow.ended_at.is_(None)) | (SessionRow.ended_at > ended_after),
            )
        ).all()
    return {v for v in found if v is not None}


def first_sightings(db: Database, vendor_session_ids: Sequence[str]) -> dict[str, datetime]:
    """When the database first saw each of these vendor sessions (no row knows them, and the
    vendor gave no usable creation time) in the vendor's list, by its own clock; a session seen
    for the first time is recorded now (``vendor_session_seen``). One indexed read and at most
    one insert per pass (``session_events`` is indexed by ``vendor_session_id``)."""
    if not vendor_session_ids:
        return {}
    keys = {storable_id(v): v for v in vendor_session_ids}
    kind = EventKind.VENDOR_SESSION_SEEN.value
    with db.transaction() as session:
        now = db_now(session)
        seen = dict(
            session.execute(
                select(SessionEvent.vendor_session_id, func.min(SessionEvent.occurred_at))
                .where(SessionEvent.vendor_session_id.in_(list(keys)), SessionEvent.kind == kind)
                .group_by(SessionEvent.vendor_session_id)
            )
            .tuples()
            .all()
        )
        new = [key for key in keys if key not in seen]
        history.log_now(
            session,
            EventKind.VENDOR_SESSION_SEEN,
            [history.Entry(None, key, {"reason": "no usable created_at"}) for key in new],
        )
    return {vendor_id: seen.get(key) or now for key, vendor_id in keys.items()}


END_REASON_LENGTH: int = SessionRow.__table__.c.end_reason.type.length  # type: ignore[attr-defined]


def record_vendor_ended(
    db: Database, session_id: uuid.UUID, *, end_reason: str, ended_at: datetime | None
) -> bool:
    """The vendor ended a session on its own (idle, error): ``ended`` with the vendor's reason
    (cut to fit its column) at the vendor's end time (kept between the start and now: the
    vendor's values are not ours to trust)."""
    end_reason = clean_text(end_reason)[:END_REASON_LENGTH] or "UNKNOWN"
    with db.transaction() as session:
        row = lock_row(session, session_id)
        if row is None or row.status not in (S.ACTIVE, S.STOPPING):
            return False
        reason = row.end_reason if row.status == S.STOPPING and row.end_reason else end_reason
        now = db_now(session)
        when = now if ended_at is None or ended_at > now else ended_at  # not in the future
        if row.started_at is not None:
            when = max(when, row.started_at)  # nor before it started (a skewed vendor clock)
        end_row(session, row, S.ENDED, end_reason=reason, ended_at=when, source="reconciler")
        return True


@dataclass(frozen=True)
class StuckStarts:
    failed: list[str]  # request ids failed START_TIMEOUT
    redispatch: list[tuple[uuid.UUID, str]]  # (row id, claim id) to dispatch again


def resolve_stuck_starts(db: Database, *, start_timeout: float) -> StuckStarts:
    """``starting`` rows nobody is starting: an attempt whose lease ran out (its worker died,
    or the vendor never answered) fails ``START_TIMEOUT``; a row admitted longer than the start
    timeout ago with no attempt since (its dispatch was lost) is dispatched again."""
    timed_out: list[uuid.UUID] = []
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
                timed_out.append(row.id)
            elif (row.admitted_at or row.start_sent_at or row.created_at) < cutoff:
                assert row.claim_id is not None
                row.admitted_at = now
                history.log(session, EventKind.REDISPATCHED, row=row)
                redispatch.append((row.id, row.claim_id))
        ended = end(
            session,
            timed_out,
            S.FAILED,
            from_statuses=[S.STARTING],
            error_code="START_TIMEOUT",
            error_message="no vendor answer recorded within ORCHESTRATOR_START_TIMEOUT_SECONDS",
        )
    return StuckStarts([e.request_id for e in ended], redispatch)


def log_orphan_stop(
    db: Database,
    vendor_session_id: str,
    *,
    outcome: str,
    created_at: str | None,
    account: str | None = None,
) -> None:
    with db.transaction() as session:
        history.log(
            session,
            EventKind.ORPHAN_STOPPED,
            vendor_session_id=storable_id(vendor_session_id),
            reason="ZOMBIE_SESSION_REAP",
            vendor_outcome=outcome,
            vendor_created_at=created_at,
            account=account,
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
