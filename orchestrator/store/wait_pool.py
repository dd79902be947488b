"""What the wait estimate reads from Postgres (docs/admission.md, "The expected wait"): the
waiting requests with their tenant and age, the live sessions' start and ``expires_at``, each
tenant's recent real session lengths and arrival rate, the policies, the decayed usage and
the pool's capacity (the open accounts' effective caps). One read-only transaction, no lock
taken: admission never waits for it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from orchestrator.db import Database
from orchestrator.store.tenants import decayed_usage, policies_in
from orchestrator.tenants import LiveSession, Pool, Waiter

#: Arrival rates are counted over this many seconds before now.
ARRIVAL_WINDOW_SECONDS = 600.0
#: Real session lengths are read from sessions created within this many seconds...
LENGTHS_WINDOW_SECONDS = 7200.0
#: ...at most this many of the latest per tenant.
LENGTHS_PER_TENANT = 200

_ALL_STATUSES = "('waiting', 'starting', 'active', 'stopping', 'ended', 'failed')"

_NOW = text("SELECT now()")
_CAPACITY = text(
    "SELECT coalesce(sum(effective_cap), 0) FROM vendor_accounts"
    " WHERE in_catalog AND enabled AND NOT draining"
    " AND (circuit_open_until IS NULL OR circuit_open_until <= now())"
)
# The waiting requests nearest the head of their tenant's queue first: every tenant's oldest,
# then every tenant's second oldest, ... up to the bound. Past it, the ones left out are the
# deepest in their tenants' queues (admitted after the ones estimated, first in first out).
_WAITERS = text(
    "SELECT id, request_id, tenant, created_at, traceparent FROM ("
    " SELECT id, request_id, tenant, created_at, traceparent,"
    "  row_number() OVER (PARTITION BY tenant ORDER BY created_at, id) AS depth"
    " FROM sessions WHERE status = 'waiting') w"
    " ORDER BY depth, created_at, id LIMIT :limit"
)
_WAITING = text("SELECT count(*) FROM sessions WHERE status = 'waiting'")
_LIVE = text(
    "SELECT tenant, coalesce(started_at, admitted_at, created_at) AS since, expires_at"
    " FROM sessions WHERE status IN ('starting', 'active', 'stopping')"
)
_LENGTHS = text(
    "SELECT tenant, seconds FROM ("  # noqa: S608 - constants of this module only
    " SELECT tenant, extract(epoch FROM ended_at - started_at) AS seconds,"
    "  row_number() OVER (PARTITION BY tenant ORDER BY ended_at DESC) AS latest"
    " FROM sessions WHERE status = 'ended'"
    f"  AND created_at > now() - make_interval(secs => {LENGTHS_WINDOW_SECONDS})"
    "  AND started_at IS NOT NULL AND ended_at > started_at) l"
    f" WHERE latest <= {LENGTHS_PER_TENANT}"
)
# Every status listed, so the (status, created_at) index serves the window.
_ARRIVALS = text(
    "SELECT tenant, count(*) AS arrived FROM sessions"  # noqa: S608 - constants only
    f" WHERE status IN {_ALL_STATUSES}"
    f" AND created_at > now() - make_interval(secs => {ARRIVAL_WINDOW_SECONDS}) GROUP BY tenant"
)


@dataclass(frozen=True)
class WaitingRequest:
    """A waiting request the pass estimates: its row and what its event needs."""

    session_id: uuid.UUID
    request_id: str
    traceparent: str | None


@dataclass(frozen=True)
class PoolSnapshot:
    """The pool as of ``now`` (the database's clock), with the requests it covers."""

    pool: Pool
    now: datetime
    requests: dict[str, WaitingRequest]
    #: Waiting requests past the bound: not estimated in this pass.
    left_out: int


def read_pool(db: Database, *, max_waiters: int, max_duration: float) -> PoolSnapshot:
    """The pool as the estimate needs it, at most ``max_waiters`` waiting requests (those
    nearest the head of their tenant's queue)."""
    with db.transaction() as session:
        now: datetime = session.scalar(_NOW)
        at = now.timestamp()
        rows = session.execute(_WAITERS, {"limit": max_waiters}).all()
        waiting = int(session.scalar(_WAITING) or 0)
        live = [
            LiveSession(
                tenant=r.tenant,
                started_at=r.since.timestamp(),
                expires_at=(
                    r.expires_at.timestamp()
                    if r.expires_at is not None
                    else r.since.timestamp() + max_duration
                ),
            )
            for r in session.execute(_LIVE)
        ]
        pool = Pool(
            capacity=int(session.scalar(_CAPACITY) or 0),
            live=live,
            waiters=[Waiter(r.request_id, r.tenant, r.created_at.timestamp()) for r in rows],
            policies=policies_in(session),
            durations=_lengths(session),
            now=at,
            max_duration=max_duration,
            usage=decayed_usage(session, now),
            arrival_rates={
                r.tenant: int(r.arrived) / ARRIVAL_WINDOW_SECONDS
                for r in session.execute(_ARRIVALS)
            },
        )
    requests = {r.request_id: WaitingRequest(r.id, r.request_id, r.traceparent) for r in rows}
    return PoolSnapshot(pool, now, requests, max(0, waiting - len(rows)))


def _lengths(session: Session) -> dict[str, list[float]]:
    lengths: dict[str, list[float]] = {}
    for r in session.execute(_LENGTHS):
        lengths.setdefault(r.tenant, []).append(float(r.seconds))
    return lengths
