"""Beat's wait-estimate pass (docs/admission.md, "The expected wait"): read the pool, run
:func:`orchestrator.tenants.estimate_waits` with no transaction open, store each waiting
request's estimate and queue the ``session.waiting`` events worth sending.

Bounded: at most :data:`MAX_WAITERS` requests per pass (those nearest the head of their
tenant's queue; the rest, the deepest in their tenants' queues, keep no estimate until they
move up, and the pass logs how many it left out) and :data:`RUNS` Monte Carlo runs (about
1.6 s of CPU for 10,000 waiters over 1,000 tenants; ``python -m benchmarks.tenants_estimate``).
A request gets its first estimate at the first pass after it starts waiting, within
``ORCHESTRATOR_WAIT_ESTIMATE_INTERVAL_SECONDS``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Final

from orchestrator.lifecycle.context import Lifecycle
from orchestrator.store.tenant_order import AGING_SECONDS, HORIZON_SECONDS
from orchestrator.store.wait_estimates import store_estimates
from orchestrator.store.wait_pool import read_pool
from orchestrator.tenants import Pool, estimate_waits

logger = logging.getLogger(__name__)

#: Waiting requests estimated per pass.
MAX_WAITERS: Final = 10_000
#: Monte Carlo runs per pass (the p90 is read from these).
RUNS: Final = 32
#: Arrivals are read, all tenants together, as at most this many times what the pool serves
#: (capacity / mean recent length): each run simulates every arrival until the last waiter is
#: admitted, so in an overload (say 17 requests/s on a pool serving one every 36 s) its cost
#: grew with the arrival rate times the longest wait (over 300 s of CPU for 10,000 waiters).
#: Capped, a run simulates about as many arrivals as it admits waiters. Beyond the cap the
#: estimate is optimistic for requests that newcomers would overtake.
OVERLOAD: Final = 2.0


@dataclass(frozen=True)
class EstimateReport:
    estimated: int
    sent: int
    left_out: int

    def as_dict(self) -> dict[str, int]:
        return {"estimated": self.estimated, "sent": self.sent, "left_out": self.left_out}


def estimate_waits_pass(
    lc: Lifecycle, *, max_waiters: int = MAX_WAITERS, runs: int = RUNS
) -> EstimateReport:
    """One pass: every waiting request (up to ``max_waiters``) gets its position and p50/p90;
    the first estimate of each, and later ones that moved enough, go out as events."""
    snapshot = read_pool(
        lc.db, max_waiters=max_waiters, max_duration=lc.settings.max_session_minutes * 60.0
    )
    if snapshot.left_out:
        logger.warning(
            "wait estimate: %d waiting request(s) past the bound of %d left without an estimate",
            snapshot.left_out,
            max_waiters,
        )
    if not snapshot.pool.waiters:
        store_estimates(lc.db, snapshot, [])  # forgets the rows of requests that left
        return EstimateReport(0, 0, snapshot.left_out)
    estimates = estimate_waits(
        bounded_arrivals(snapshot.pool), aging=AGING_SECONDS, horizon=HORIZON_SECONDS, runs=runs
    )
    stored = store_estimates(lc.db, snapshot, estimates)
    return EstimateReport(stored.estimated, stored.sent, snapshot.left_out)


def bounded_arrivals(pool: Pool) -> Pool:
    """The pool with its arrival rates scaled down, together, to at most :data:`OVERLOAD`
    times the rate its slots serve requests at (capacity over the mean recent length)."""
    rates = pool.arrival_rates or {}
    total = sum(r for r in rates.values() if r > 0)
    lengths = [d for ds in pool.durations.values() for d in ds if d > 0]
    mean = sum(lengths) / len(lengths) if lengths else pool.max_duration
    ceiling = OVERLOAD * max(pool.capacity, 1) / max(mean, 1.0)
    if total <= ceiling:
        return pool
    scale = ceiling / total
    return replace(pool, arrival_rates={t: r * scale for t, r in rates.items()})
