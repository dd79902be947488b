"""Tenants in the database: their policies (``tenants``, set with the CLI, read by the next
admission decision) and their usage (``tenant_totals``, kept exact by triggers on ``sessions``,
migrations 0009 and 0012). docs/admission.md ("Tenants") is the design."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from orchestrator.db import Database, Tenant
from orchestrator.tenants import TenantPolicy

USAGE_WINDOW_SECONDS = 3600.0  # the decay of used_seconds (migrations 0009, 0012)

# The session-seconds per tenant and account, decayed in Python and summed per tenant: the
# view tenant_totals does the same, but aggregates every row where this reads them as they are.
_USED = text(
    "SELECT tenant, used_seconds, used_at FROM tenant_account_usage WHERE used_seconds > 0"
)
# The tenants among ``names`` that have a maximum, their policy rows locked by name (after the
# account's row: docs/admission.md, "The lock scheme"). A join, not ``= ANY(:names)``: with a
# thousand names that compares each row with each.
_LOCK_CAPPED = text(
    "SELECT p.name FROM tenants p JOIN unnest(CAST(:names AS text[])) AS n(name)"
    " ON n.name = p.name WHERE p.maximum IS NOT NULL ORDER BY p.name FOR UPDATE OF p"
)


def decayed_usage(session: Session, now: datetime) -> dict[str, float]:
    """Each tenant's session-seconds decayed to ``now``, summed over its accounts (as
    admission and the wait estimate read them)."""
    used: dict[str, float] = {}
    for r in session.execute(_USED):
        age = max(0.0, (now - r.used_at).total_seconds()) if r.used_at is not None else 0.0
        decayed = float(r.used_seconds) * math.exp(-age / USAGE_WINDOW_SECONDS)
        used[r.tenant] = used.get(r.tenant, 0.0) + decayed
    return used


def lock_capped(session: Session, names: list[str]) -> list[str]:
    """Lock the policy rows of the tenants among ``names`` with a maximum, so no claim of
    theirs on another account admits meanwhile; their names, sorted."""
    return list(session.scalars(_LOCK_CAPPED, {"names": names}))


def set_policy(db: Database, policy: TenantPolicy) -> None:
    """Create or replace a tenant's policy; the next claim or admission applies it."""
    values = {
        "name": policy.name,
        "guaranteed": policy.guaranteed,
        "maximum": policy.maximum,
        "weight": policy.weight,
        "reserved": policy.reserved,
        "max_waiting": policy.waiting_cap,
    }
    statement = insert(Tenant).values(**values)
    with db.transaction() as session:
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["name"],
                set_={**{k: statement.excluded[k] for k in values if k != "name"}},
            ).values(updated_at=text("now()"))
        )


def policies(db: Database) -> dict[str, TenantPolicy]:
    """Every configured tenant's policy, by name."""
    with db.transaction() as session:
        return policies_in(session)


def policies_in(session: Session) -> dict[str, TenantPolicy]:
    """:func:`policies`, in the caller's transaction (read as of this statement)."""
    rows = session.scalars(select(Tenant).order_by(Tenant.name)).all()
    return {
        r.name: TenantPolicy(
            name=r.name,
            guaranteed=r.guaranteed,
            maximum=r.maximum,
            weight=r.weight,
            waiting_cap=r.max_waiting,
            reserved=r.reserved,
        )
        for r in rows
    }


@dataclass(frozen=True)
class TenantUsageState:
    """One tenant's usage: live sessions across every account, waiting requests, the oldest
    waiting request's arrival, and its decayed session-seconds."""

    name: str
    in_use: int
    waiting: int
    oldest_waiting_at: datetime | None
    used_seconds: float


def usage(db: Database) -> list[TenantUsageState]:
    """Every tenant with a usage row, by name (the oldest waiting request: an index probe)."""
    with db.transaction() as session:
        rows = session.execute(
            text(
                "SELECT u.name, u.in_use, u.waiting, u.used_seconds,"
                " (SELECT min(s.created_at) FROM sessions s"
                "   WHERE s.status = 'waiting' AND s.tenant = u.name) AS oldest_waiting_at"
                " FROM tenant_totals u ORDER BY u.name"
            )
        ).all()
    return [
        TenantUsageState(r.name, r.in_use, r.waiting, r.oldest_waiting_at, r.used_seconds)
        for r in rows
    ]


@dataclass(frozen=True)
class TenantDrift:
    name: str
    in_use: int
    counted_in_use: int
    waiting: int
    counted_waiting: int


def tenant_drift(db: Database) -> list[TenantDrift]:
    """Tenants whose counters differ from a count of their rows (one snapshot)."""
    with db.transaction() as session:
        rows = session.execute(
            text(
                "SELECT name, in_use, counted_in_use, waiting, counted_waiting"
                " FROM tenant_counts WHERE in_use <> counted_in_use"
                " OR waiting <> counted_waiting ORDER BY name"
            )
        ).all()
    return [TenantDrift(**row._mapping) for row in rows]
