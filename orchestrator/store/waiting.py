"""Waiting requests: their admission into an account's free slots (``admit``, after a slot
frees and on beat as a backstop), which accounts may admit now, and the deadlines of waiting
rows. The design: docs/admission.md ("One decision", "First in first out")."""

from __future__ import annotations

import uuid

from sqlalchemy import bindparam, func, select, text

from orchestrator.db import Database, EventKind, SessionRow
from orchestrator.db.types import JSONDocument
from orchestrator.store import history
from orchestrator.store.admission import VENDOR_ACCOUNT, lock_admission
from orchestrator.store.ending import end
from orchestrator.store.rows import S, db_now

# The account's row, locked, if it is open (in the catalog, enabled, not draining, circuit
# closed); its free slots (none known: as many as wait).
_LOCK_OPEN_ACCOUNT = text(
    "SELECT name, labels, effective_cap, in_use FROM vendor_accounts"
    " WHERE name = :account AND in_catalog AND enabled AND NOT draining"
    " AND (circuit_open_until IS NULL OR circuit_open_until <= clock_timestamp())"
    " FOR UPDATE"
)
# The oldest waiting requests this account may serve: bound to it, or to none with labels it
# carries. Rows another transaction holds (a stop ending them) are skipped, not waited for:
# their lock comes before the account's in every other path.
_ELIGIBLE_WAITING = text(
    "SELECT id FROM sessions"
    " WHERE status = 'waiting' AND (account = :account OR (account IS NULL"
    "   AND (requested_labels IS NULL OR CAST(:labels AS jsonb) @> requested_labels)))"
    " ORDER BY created_at, id LIMIT :limit FOR UPDATE SKIP LOCKED"
).bindparams(bindparam("labels", type_=JSONDocument))


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
        ids = session.scalars(
            _ELIGIBLE_WAITING, {"account": account, "labels": found.labels, "limit": free}
        ).all()
        if not ids:
            return admitted
        now = db_now(session)
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
    return admitted


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
