"""Whose waiting request an account's free slot goes to when several tenants wait for it:
:func:`orchestrator.tenants.choose` over the tenants' usage rows (docs/admission.md, "The
order when a slot frees"), first in first out within a tenant. Called by ``admit`` under the
account's row lock; the policy rows of the backlogged tenants with a maximum are locked
after it, by name."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Row, bindparam, text
from sqlalchemy.orm import Session

from orchestrator.db.types import JSONDocument
from orchestrator.store.tenants import decayed_usage, lock_capped, policies_in
from orchestrator.tenants import TenantState, choose

#: A request waiting this long goes before fair sharing (docs/admission.md, "Aging").
AGING_SECONDS = 900.0
#: Seconds charged up front for each live session (its length is not known at its start).
HORIZON_SECONDS = 600.0

_ELIGIBLE = (
    "s.status = 'waiting' AND (s.account = :account OR (s.account IS NULL"
    " AND (s.requested_labels IS NULL OR CAST(:labels AS jsonb) @> s.requested_labels)))"
)
# Per tenant: its requests waiting that this account may serve, and the oldest one's arrival.
_BACKLOG = text(
    f"SELECT s.tenant, count(*) AS waiting, min(s.created_at) AS oldest FROM sessions s"  # noqa: S608
    f" WHERE {_ELIGIBLE} GROUP BY s.tenant"
).bindparams(bindparam("labels", type_=JSONDocument))
_OTHERS_LIVE = text("SELECT name, in_use FROM tenant_totals WHERE in_use > 0")
_POOL = text(
    "SELECT coalesce(sum(effective_cap), 0) AS cap FROM vendor_accounts"
    " WHERE in_catalog AND enabled AND NOT draining"
    " AND (circuit_open_until IS NULL OR circuit_open_until <= clock_timestamp())"
)
_NEXT = text(
    f"SELECT s.id FROM sessions s WHERE {_ELIGIBLE} AND s.tenant = :tenant"  # noqa: S608
    " AND NOT (s.id = ANY(:taken)) ORDER BY s.created_at, s.id LIMIT 1 FOR UPDATE SKIP LOCKED"
).bindparams(bindparam("labels", type_=JSONDocument))


# Whether requests of more than one tenant wait anywhere: a look at the usage rows, so the
# common case (one tenant waits) reads no waiting row here.
_SEVERAL_WAIT = text(
    "SELECT count(*) FROM (SELECT DISTINCT tenant FROM tenant_account_usage"
    " WHERE waiting > 0 LIMIT 2) w"
)
# Whether any tenant has a non-lendable reservation (then even one tenant's requests go
# through ``choose``, which keeps the free slots the others' reservations need).
ANY_RESERVATION = text("SELECT EXISTS (SELECT FROM tenants WHERE reserved > 0)")


def needs_order(session: Session) -> bool:
    """Whether a freed slot's taker is for ``choose`` to decide: requests of several tenants
    wait, or a reservation may keep the slot."""
    return (session.scalar(_SEVERAL_WAIT) or 0) >= 2 or bool(session.scalar(ANY_RESERVATION))


def backlog(session: Session, account: str, labels: object) -> list[Row[tuple[str, int, datetime]]]:
    """Per tenant, the requests waiting that ``account`` may serve; none if no order is to
    be decided (:func:`needs_order`: one tenant waits, no reservation; its oldest go first)."""
    if not needs_order(session):
        return []
    return list(session.execute(_BACKLOG, {"account": account, "labels": labels}).all())


def admit_in_order(
    session: Session,
    *,
    account: str,
    labels: object,
    free: int,
    now: datetime,
    waiting: list[Row[tuple[str, int, datetime]]],
) -> list[uuid.UUID]:
    """Up to ``free`` waiting requests for ``account``, in the tenants' order (each id once)."""
    names = sorted(r.tenant for r in waiting)
    lock_capped(session, names)  # a tenant without a maximum needs no tenant-wide lock
    used = decayed_usage(session, now)
    policies = policies_in(session)
    live = {r.name: int(r.in_use) for r in session.execute(_OTHERS_LIVE)}
    states: dict[str, TenantState] = {n: TenantState(in_use=i) for n, i in live.items()}
    for r in waiting:
        states[r.tenant] = TenantState(
            in_use=live.get(r.tenant, 0),
            waiting=int(r.waiting),
            oldest_since=r.oldest.timestamp(),
            used_seconds=used.get(r.tenant, 0.0),
        )
    in_use = sum(s.in_use for s in states.values())
    capacity = max(int(session.scalar(_POOL) or 0), in_use + free)
    chosen: list[uuid.UUID] = []
    while len(chosen) < free:
        choice = choose(
            capacity,
            states,
            policies,
            now.timestamp(),
            aging=AGING_SECONDS,
            horizon=HORIZON_SECONDS,
        )
        if choice is None:
            break
        found = session.scalar(
            _NEXT, {"account": account, "labels": labels, "tenant": choice.tenant, "taken": chosen}
        )
        state = states[choice.tenant]
        if found is None:  # taken meanwhile: this tenant has no more here
            states[choice.tenant] = TenantState(state.in_use, 0, None, state.used_seconds)
            continue
        chosen.append(found)
        after = session.scalar(
            text(
                f"SELECT min(s.created_at) FROM sessions s WHERE {_ELIGIBLE}"  # noqa: S608
                " AND s.tenant = :tenant AND NOT (s.id = ANY(:taken))"
            ).bindparams(bindparam("labels", type_=JSONDocument)),
            {"account": account, "labels": labels, "tenant": choice.tenant, "taken": chosen},
        )
        states[choice.tenant] = TenantState(
            in_use=state.in_use + 1,
            waiting=state.waiting - 1 if after is not None else 0,
            oldest_since=None if after is None else after.timestamp(),
            used_seconds=state.used_seconds,
        )
    return chosen
