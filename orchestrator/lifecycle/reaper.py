"""The reaper: ends every session whose ``expires_at`` has passed, and retries stuck stops."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from orchestrator.lifecycle import store, tracing
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.lifecycle.stop import execute_stop

logger = logging.getLogger(__name__)
BATCH_SIZE = 200


@dataclass(frozen=True)
class ReapReport:
    claimed: int
    stopped: int
    failed: int


def reap(lc: Lifecycle, *, max_batches: int = 50) -> ReapReport:
    """One sweep: claim due rows in batches (SKIP LOCKED), stop each at the vendor in parallel."""
    claimed = stopped = 0
    pool = lc.stop_pool()
    with tracing.sweep_span("session.reap") as span:
        for _ in range(max_batches):
            tickets = store.claim_due_stops(
                lc.db, limit=BATCH_SIZE, retry_in=lc.settings.stop_retry_seconds
            )
            tracing.link_sessions(span, [ticket.traceparent for ticket in tickets])
            claimed += len(tickets)
            stopped += sum(pool.map(lambda ticket: execute_stop(lc, ticket), tickets))
            if len(tickets) < BATCH_SIZE:
                break
        tracing.set_attributes(span, claimed=claimed, stopped=stopped)
    if claimed:
        logger.info(
            "reaper: %d due, %d stopped, %d left for retry", claimed, stopped, claimed - stopped
        )
    return ReapReport(claimed, stopped, claimed - stopped)
