"""Waiting requests: their admission into an account's free slots (``admit``, after a slot
frees and on beat as a backstop), which accounts may admit now, and the deadlines of waiting
rows. The design: docs/admission.md ("One decision", "First in first out")."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, func, select, text
from sqlalchemy.orm import Session

from orchestrator.db import Database, EventKind, SessionRow
from orchestrator.db.types import JSONDocument
from orchestrator.store import history, tenant_order
from orchestrator.store.admission import VENDOR_ACCOUNT, lock_admission
from orchestrator.store.ending import end
from orchestrator.store.rows import S, db_now
from orchestrator.store.tenants import lock_capped

# The account's row, locked, if it is open (in the catalog, enabled, not draining, circuit
# closed); its free slots (none known: as many as wait).
_LOCK_OPEN_ACCOUNT = text(
    "SELECT name, labels, effective_cap, in_use FROM vendor_accounts"
    " WHERE name = :account AND in_catalog AND enabled AND NOT draining"
    " AND (circuit_open_until IS NULL OR circuit_open_until <= clock_timestamp())"
    " FOR UPDATE"
)
# The oldest waiting requests this account may serve: bound to it, or to none with labels it
# carries, of a tenant below its maximum. Rows another transaction holds (a stop ending them)
# are skipped, not waited for: their lock comes before the account's in every other path.
_ELIGIBLE_WAITING = text(
    "SELECT s.id, s.tenant FROM sessions s"
    " WHERE s.status = 'waiting' AND (s.account = :account OR (s.account IS NULL"
    "   AND (s.requested_labels IS NULL OR CAST(:labels AS jsonb) @> s.requested_labels)))"
    "   AND NOT (s.tenant = ANY(CAST(:full AS text[])))"
    " ORDER BY s.created_at, s.id LIMIT :limit FOR UPDATE OF s SKIP LOCKED"
).bindparams(bindparam("labels", type_=JSONDocument))
# The tenants at their maximum (one pass over the configured tenants, not per waiting row).
_FULL_TENANTS = text(
    "SELECT coalesce(array_agg(p.name), '{}') FROM tenants p JOIN tenant_totals u"
    " ON u.name = p.name WHERE p.maximum IS NOT NULL AND u.in_use >= p.maximum"
)
# The slots each tenant with a maximum may still take, summed over the accounts.
_ROOM = text(
    "SELECT p.name, p.maximum - coalesce(u.in_use, 0) AS room FROM tenants p"
    " LEFT JOIN tenant_totals u ON u.name = p.name"
    " WHERE p.name = ANY(:names) AND p.maximum IS NOT NULL"
)


MAX_PASSES = 16


def admit(db: Database, *, account: str = VENDOR_ACCOUNT) -> list[tuple[uuid.UUID, str]]:
    """Move the oldest ``waiting`` requests eligible for ``account`` into its free slots, if
    it is open; (row id, new claim id) each."""
    admitted: list[tuple[uuid.UUID, str]] = []
    with db.transaction() as session:
        if account == VENDOR_ACCOUNT:
            lock_admission(session)  # the previous release may still claim beside this one
        found = session.execute(_LOCK_OPEN_ACCOUNT, {"account": account}).one_or_none()
        if found is None:
            return admitted
        if found.effective_cap is None:
            free = session.scalar(select(func.count()).where(SessionRow.status == S.WAITING.value))
        else:
            free = found.effective_cap - found.in_use
        if not free or free <= 0:
            return admitted
        now = db_now(session)
        waiting = tenant_order.backlog(session, account, found.labels)
        # Several tenants wait for this account, or reservations may keep its free slots:
        # the tenants' order decides.
        if len(waiting) > 1 or (waiting and session.scalar(tenant_order.ANY_RESERVATION)):
            ids = tenant_order.admit_in_order(
                session, account=account, labels=found.labels, free=free, now=now, waiting=waiting
            )
            _to_starting(session, ids, account, now, admitted)
            return admitted
        # One tenant (or none): its oldest first, up to its maximum. Each pass after the
        # first follows the tenant reaching its maximum within the batch; bounded all the same.
        for _ in range(MAX_PASSES):
            if free <= 0:
                break
            full = list(session.scalar(_FULL_TENANTS) or [])
            candidates = session.execute(
                _ELIGIBLE_WAITING,
                {"account": account, "labels": found.labels, "limit": free, "full": full},
            ).all()
            ids = _within_maximums(session, candidates)
            _to_starting(session, ids, account, now, admitted)
            free -= len(ids)
            if len(ids) == len(candidates):  # none held back by a maximum: no more wait
                break
            session.flush()  # the tenants' counters (the trigger) before the next look
    return admitted


def _to_starting(
    session: Session,
    ids: Sequence[uuid.UUID],
    account: str,
    now: datetime,
    admitted: list[tuple[uuid.UUID, str]],
) -> None:
    if not ids:
        return
    rows = session.scalars(
        select(SessionRow)
        .where(SessionRow.id.in_(ids))
        .order_by(SessionRow.created_at, SessionRow.id)
    ).all()
    for row in rows:
        row.status = S.STARTING.value
        row.account = account
        row.claim_id = f"admit-{uuid.uuid4()}"
        row.admitted_at = now
        row.attempt_owner = None
        row.attempt_lease_until = None
        waited = (now - row.created_at).total_seconds()
        history.log(
            session,
            EventKind.ADMITTED,
            row=row,
            account=account,
            waited_seconds=round(waited, 3),
        )
        admitted.append((row.id, row.claim_id))


def _within_maximums(session: Session, candidates: Sequence[Row[Any]]) -> list[uuid.UUID]:
    """The candidates (oldest first) their tenants' maximums let in now: the policy rows of
    the tenants with one are locked, so no claim of theirs on another account admits
    meanwhile."""
    names = sorted({c.tenant for c in candidates})
    if not names:
        return []
    capped = lock_capped(session, names)
    room: dict[str, int | None] = {
        r.name: r.room for r in session.execute(_ROOM, {"names": capped})
    }
    chosen: list[uuid.UUID] = []
    for candidate in candidates:
        left = room.get(candidate.tenant)
        if left is not None:
            if left <= 0:
                continue
            room[candidate.tenant] = left - 1
        chosen.append(candidate.id)
    return chosen


def open_accounts(db: Database) -> list[str]:
    """The accounts that may admit now, by name."""
    with db.transaction() as session:
        return list(
            session.scalars(
                text(
                    "SELECT name FROM vendor_accounts WHERE in_catalog AND enabled"
                    " AND NOT draining AND (circuit_open_until IS NULL"
                    " OR circuit_open_until <= clock_timestamp()) ORDER BY name"
                )
            )
        )


# Why an account gave a request bound to it no slot (its name is the operator's, no secret).
_ACCOUNT_STATE = text(
    "SELECT CASE WHEN NOT in_catalog THEN 'not in the catalog'"
    " WHEN NOT enabled THEN 'disabled' WHEN draining THEN 'draining'"
    " WHEN circuit_open_until > clock_timestamp() THEN 'circuit open'"
    " ELSE 'no slot free' END FROM vendor_accounts WHERE name = :account"
)


def expire_waiting(db: Database) -> list[str]:
    """``waiting`` rows past their ``start_deadline_at`` → ``failed`` ``CAPACITY_TIMEOUT``; a
    request bound to an account (named, or an uncertain failure's) is told which, and why."""
    expired: list[str] = []
    with db.transaction() as session:
        found = session.execute(
            select(SessionRow.id, SessionRow.account)
            .where(SessionRow.status == S.WAITING.value, SessionRow.start_deadline_at <= func.now())
            .with_for_update(skip_locked=True)
        ).all()
        by_account: dict[str | None, list[uuid.UUID]] = {}
        for row_id, account in found:
            by_account.setdefault(account, []).append(row_id)
        for account, ids in sorted(by_account.items(), key=lambda item: item[0] or ""):
            message = "no free session slot before start_deadline_seconds passed"
            if account is not None:
                why = session.scalar(_ACCOUNT_STATE, {"account": account}) or "unknown"
                message = (
                    f"no free session slot on account {account} ({why})"
                    " before start_deadline_seconds passed"
                )
            ended = end(
                session,
                ids,
                S.FAILED,
                from_statuses=[S.WAITING],
                error_code="CAPACITY_TIMEOUT",
                error_message=message,
            )
            expired += [e.request_id for e in ended]
    return expired


def has_waiting(db: Database) -> bool:
    with db.transaction() as session:
        return (
            session.scalar(
                select(SessionRow.id).where(SessionRow.status == S.WAITING.value).limit(1)
            )
            is not None
        )
