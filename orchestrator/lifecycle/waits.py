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
from dataclasses import dataclass
from typing import Final

from orchestrator.lifecycle.context import Lifecycle
from orchestrator.store.tenant_order import AGING_SECONDS, HORIZON_SECONDS
from orchestrator.store.wait_estimates import store_estimates
from orchestrator.store.wait_pool import read_pool
from orchestrator.tenants import estimate_waits

logger = logging.getLogger(__name__)

#: Waiting requests estimated per pass.
MAX_WAITERS: Final = 10_000
#: Monte Carlo runs per pass (the p90 is read from these).
RUNS: Final = 32


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
        snapshot.pool, aging=AGING_SECONDS, horizon=HORIZON_SECONDS, runs=runs
    )
    stored = store_estimates(lc.db, snapshot, estimates)
    return EstimateReport(stored.estimated, stored.sent, snapshot.left_out)
