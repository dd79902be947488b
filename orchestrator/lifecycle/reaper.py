"""The reaper: ends every session whose ``expires_at`` has passed, and retries stuck stops."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from orchestrator import store, tracing
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.lifecycle.stop import finish_confirmed, stop_at_vendor

logger = logging.getLogger(__name__)
BATCH_SIZE = 200
TIMER_GRANULARITY = 0.1  # seconds: expiries this close together share one timed sweep


@dataclass(frozen=True)
class ReapReport:
    claimed: int
    stopped: int
    failed: int


def reap(lc: Lifecycle, *, max_batches: int = 50, plan_ahead: float = 0.0) -> ReapReport:
    """One sweep: claim due rows in batches (SKIP LOCKED), stop each at the vendor in parallel,
    end the confirmed ones of a batch in one transaction.

    With ``plan_ahead`` (beat's periodic sweep passes its interval), sessions that expire
    before the next periodic sweep get a sweep of their own at their expiry, in this process:
    a session is not left running (and billing) up to a whole interval past its end. If this
    process dies, the next periodic sweep ends them.
    """
    claimed = stopped = 0
    pool = lc.stop_pool()
    with tracing.sweep_span("session.reap") as span:
        for _ in range(max_batches):
            tickets = store.claim_due_stops(
                lc.db, limit=BATCH_SIZE, retry_in=lc.settings.stop_retry_seconds
            )
            tracing.link_sessions(span, [ticket.traceparent for ticket in tickets])
            claimed += len(tickets)
            outcomes = pool.map(lambda ticket: stop_at_vendor(lc, ticket), tickets)
            confirmed = {t: o for t, o in zip(tickets, outcomes, strict=True) if o is not None}
            stopped += len(finish_confirmed(lc, confirmed))
            if len(tickets) < BATCH_SIZE:
                break
        tracing.set_attributes(span, claimed=claimed, stopped=stopped)
    if plan_ahead > 0:
        _plan_sweeps(lc, plan_ahead)
    if claimed:
        logger.info(
            "reaper: %d due, %d stopped, %d left for retry", claimed, stopped, claimed - stopped
        )
    return ReapReport(claimed, stopped, claimed - stopped)


def _plan_sweeps(lc: Lifecycle, horizon: float) -> None:
    """Timers count seconds from now by the database's clock: no host's clock is trusted to
    agree with the ``expires_at`` another host wrote."""
    due = store.seconds_to_expiries(lc.db, horizon)
    buckets = sorted({math.ceil(seconds / TIMER_GRANULARITY) for seconds in due})
    for bucket in buckets:
        lc.call_later(bucket * TIMER_GRANULARITY, lambda: _timed_sweep(lc))


def _timed_sweep(lc: Lifecycle) -> None:
    try:
        reap(lc)
    except Exception:  # the periodic sweep is the backstop
        logger.warning("timed reaper sweep failed", exc_info=True)
