"""A started request back to ``waiting``: the vendor refused it at its limit, or its account
failed it and another may serve it; and the release of requests an uncertain failure bound to
their account, once that account's list has been read (docs/admission.md, "Health")."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, text

from orchestrator.db import Database, EventKind, SessionRow
from orchestrator.db.types import JSONDocument
from orchestrator.store import history
from orchestrator.store.ending import end_row
from orchestrator.store.rows import USER_CLOSED, S, db_now
from orchestrator.store.starts import NotRecorded, Recorded, StartTicket, lock_own_attempt

# Another account could serve this request (pool-wide, open or about to be: its circuit
# state is not asked, it closes on its own); with the labels it asks for, if any.
_ANOTHER_ACCOUNT = (
    "SELECT EXISTS (SELECT 1 FROM vendor_accounts WHERE name <> :account"
    " AND in_catalog AND enabled AND NOT draining{labels})"
)
_ANY = text(_ANOTHER_ACCOUNT.format(labels=""))
_LABELLED = text(
    _ANOTHER_ACCOUNT.format(labels=" AND labels @> CAST(:labels AS jsonb)")
).bindparams(bindparam("labels", type_=JSONDocument))


def another_account_may_serve(db: Database, ticket: StartTicket) -> bool:
    """Whether a start that failed on its account may wait for another one: it names no
    account, and another enabled account in the catalog carries its labels."""
    with db.transaction() as session:
        row = session.get(SessionRow, ticket.session_id)
        if row is None or row.requested_account is not None or row.account is None:
            return False
        if row.requested_labels is None:
            return bool(session.scalar(_ANY, {"account": row.account}))
        found = session.scalar(_LABELLED, {"account": row.account, "labels": row.requested_labels})
        return bool(found)


_CIRCUIT_OPEN = text(
    "SELECT coalesce(circuit_open_until > clock_timestamp(), false) FROM vendor_accounts"
    " WHERE name = :account"
)


def named_account_circuit_open(db: Database, ticket: StartTicket) -> bool | None:
    """Whether the account a start names has its circuit open now; None if the request
    names no account (or its row is gone)."""
    with db.transaction() as session:
        row = session.get(SessionRow, ticket.session_id)
        if row is None or row.requested_account is None:
            return None
        return bool(session.scalar(_CIRCUIT_OPEN, {"account": row.requested_account}))


def back_to_waiting(
    db: Database, ticket: StartTicket, *, vendor_error: str, uncertain: bool = False
) -> Recorded | NotRecorded:
    """Wait again (first in line, by age): the vendor said the account is at its limit, or
    it failed a pool-wide start. Certain failures (a limit reply, a refused connection) may
    go to any eligible account; an ``uncertain`` one (a 5xx, a timeout: the vendor may have
    made a session) stays bound to its account, with ``uncertain_at``, until that account's
    reconciler lists its sessions (:func:`release_uncertain_waits`). Recorded.YES once
    written, else why not (as :func:`record_failed`)."""
    with db.transaction() as session:
        row = lock_own_attempt(session, ticket)
        if isinstance(row, NotRecorded):
            return row
        if row.stop_requested_at is not None:
            end_row(session, row, S.ENDED, end_reason=row.end_reason or USER_CLOSED)
            return Recorded.YES
        row.status = S.WAITING.value
        if uncertain:
            row.uncertain_at = db_now(session)  # bound to its account until it is listed
        else:
            row.account = row.requested_account
        row.attempt_owner = None
        row.attempt_lease_until = None
        row.admitted_at = None
        history.log(
            session,
            EventKind.BACK_TO_WAITING,
            row=row,
            vendor_error=vendor_error,
            bound_to=row.account if uncertain else None,
        )
        return Recorded.YES


_RELEASE_UNCERTAIN = text(
    "UPDATE sessions SET account = requested_account"
    " WHERE status = 'waiting' AND account = :account AND requested_account IS NULL"
    " AND uncertain_at IS NOT NULL AND uncertain_at < :listed_at"
)


def release_uncertain_waits(db: Database, account: str, listed_at: datetime) -> int:
    """A list of ``account``'s sessions begun at ``listed_at`` succeeded: any session an
    uncertain start made there before then was in it (and is stopped as an orphan with this
    account's key), so the requests waiting bound to it may go to any eligible account. How
    many were released."""
    with db.transaction() as session:
        released = session.execute(_RELEASE_UNCERTAIN, {"account": account, "listed_at": listed_at})
        return int(getattr(released, "rowcount", 0) or 0)
