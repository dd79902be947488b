"""How long each waiting request will wait: its position in the order the policy will admit in,
and a p50/p90 of its wait.

Built from what is known (docs/admission.md "Tenants", "The expected wait"):

- the live sessions' ``expires_at`` (no session outlives it);
- each tenant's recent real session lengths, an empirical sample (sessions often end before
  they expire);
- the policy's order, including later arrivals of tenants below their guarantee, which will
  overtake every request waiting now (from their recent arrival rate).

A Monte Carlo over sampled end times: each run draws when every live session ends (its
tenant's lengths, conditioned on the time it has already lived, capped at its expiry), hands
the freed slots to the overtakers and the waiters in order (a waiter whose tenant is at its
maximum lets the next one pass until one of its tenant's sessions ends), and draws each
admitted session's length in turn. Cost: O(runs * (waiters + live) * log capacity).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from orchestrator.tenants.choice import TenantState, charge
from orchestrator.tenants.montecarlo import Lengths, Runs
from orchestrator.tenants.policy import (
    TenantPolicy,
    effective_guarantees,
    policy_for,
)

#: The runs' quantiles quoted as p50 and p90.
P50_LEVEL: Final = 0.5
P90_LEVEL: Final = 0.9
#: The quoted p90 is p50 + P90_STRETCH x (the runs' p90 - p50). The runs know the present
#: (live sessions, lengths, rates) but not how the load will change, so their spread is too
#: narrow; tuned on lognormal traces (tests/test_wait_estimate.py, judged on Weibull and
#: gamma mixtures).
P90_STRETCH: Final = 2.0
#: How far ahead a run looks; a wait beyond it is quoted as infinite.
LOOKAHEAD: Final = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class LiveSession:
    """A session holding a slot (starting, active or stopping)."""

    tenant: str
    started_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Waiter:
    """A waiting request."""

    request_id: str
    tenant: str
    since: float


@dataclass(frozen=True, slots=True)
class WaitEstimate:
    """One waiting request's position (1 = next) and its wait in seconds from ``now``."""

    request_id: str
    position: int
    p50: float
    p90: float


@dataclass(frozen=True, slots=True)
class Pool:
    """What the estimate reads, as of ``now``."""

    capacity: int
    live: Sequence[LiveSession]
    waiters: Sequence[Waiter]
    policies: Mapping[str, TenantPolicy]
    #: Recent real session lengths (seconds) per tenant; tenants without use everyone's.
    durations: Mapping[str, Sequence[float]]
    now: float
    #: Longest a new session may live (its expiry after it starts).
    max_duration: float
    #: Session-seconds per tenant over the fair-share window (choice.TenantState.used_seconds).
    usage: Mapping[str, float] | None = None
    #: Recent arrivals per second, per tenant (every tenant given is simulated arriving).
    arrival_rates: Mapping[str, float] | None = None


def admission_order(pool: Pool, *, aging: float, horizon: float) -> list[int]:
    """Indexes of ``pool.waiters`` in the order the policy will admit them.

    The ranks of :func:`choice.choose`, applied as if no session ended meanwhile (each
    grant raises its tenant's count and charge); a tenant's maximum is left to the runs.
    """
    in_use: dict[str, int] = {}
    for s in pool.live:
        in_use[s.tenant] = in_use.get(s.tenant, 0) + 1
    queues: dict[str, list[int]] = {}
    for i in sorted(range(len(pool.waiters)), key=lambda i: pool.waiters[i].since):
        queues.setdefault(pool.waiters[i].tenant, []).append(i)
    guarantees = effective_guarantees(pool.capacity, pool.policies)
    usage = pool.usage or {}
    heads = dict.fromkeys(queues, 0)

    def rank(tenant: str) -> tuple[tuple[float, ...], str]:
        since = pool.waiters[queues[tenant][heads[tenant]]].since
        used = in_use.get(tenant, 0)
        g = guarantees.get(tenant)
        if g is not None and used < g.reserved:
            return (0, used - g.reserved, since), tenant
        if g is not None and used < g.guaranteed:
            return (1, used - g.guaranteed, since), tenant
        if pool.now - since >= aging:
            return (2, since), tenant
        state = TenantState(in_use=used, used_seconds=usage.get(tenant, 0.0))
        return (3, charge(state, policy_for(pool.policies, tenant), horizon), since), tenant

    heap = [rank(t) for t in queues]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        _, tenant = heapq.heappop(heap)
        order.append(queues[tenant][heads[tenant]])
        heads[tenant] += 1
        in_use[tenant] = in_use.get(tenant, 0) + 1
        if heads[tenant] < len(queues[tenant]):
            heapq.heappush(heap, rank(tenant))
    return order


def estimate_waits(
    pool: Pool,
    *,
    aging: float,
    horizon: float,
    runs: int = 48,
    seed: int = 0,
    p50_level: float = P50_LEVEL,
    p90_level: float = P90_LEVEL,
    p90_stretch: float = P90_STRETCH,
) -> list[WaitEstimate]:
    """Position and p50/p90 wait of every waiting request, in admission order.

    A wait that no run could end (no capacity at all) is ``math.inf``.
    """
    if not pool.waiters:
        return []
    order = admission_order(pool, aging=aging, horizon=horizon)
    lengths = Lengths(pool.durations, pool.max_duration)
    every = Runs(pool, lengths, aging=aging, horizon=horizon)
    rng = random.Random(seed)
    draws = [every.run(rng, pool.now + LOOKAHEAD) for _ in range(max(1, runs))]
    out = []
    for k, i in enumerate(order):
        sample = sorted(d[i] for d in draws)
        p50, p90 = _quantile(sample, p50_level), _quantile(sample, p90_level)
        if math.isfinite(p90):
            p90 = max(p50, p50 + p90_stretch * (p90 - p50))
        out.append(
            WaitEstimate(
                request_id=pool.waiters[i].request_id,
                position=k + 1,
                p50=p50,
                p90=p90,
            )
        )
    return out


def _quantile(ordered: list[float], level: float) -> float:
    at = level * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    if math.isinf(ordered[high]):
        return ordered[high] if at > low else ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


@dataclass(frozen=True, slots=True)
class SentQuote:
    """The last estimate sent to a request in a ``session.waiting`` event."""

    sent_at: float
    #: When the request was expected to be admitted (``sent_at`` + p50, + p90).
    p50_at: float
    p90_at: float


#: Re-send when p50 or p90 moved by more than this fraction of the wait left...
RESEND_FRACTION: Final = 0.25
#: ...but at most once per this many seconds per request...
RESEND_INTERVAL: Final = 30.0
#: ...and never for a move smaller than this many seconds (short waits do not flap).
RESEND_FLOOR: Final = 15.0


def should_resend(
    last: SentQuote | None,
    estimate: WaitEstimate,
    now: float,
    *,
    fraction: float = RESEND_FRACTION,
    interval: float = RESEND_INTERVAL,
    floor: float = RESEND_FLOOR,
) -> bool:
    """Whether a request's new estimate is worth another ``session.waiting`` event.

    Always for the first. Then only when at least ``interval`` seconds passed since the last
    one and its expected admission time (p50 or p90) moved by more than ``fraction`` of the
    wait the last quote had left (at least ``floor`` seconds). Times are compared as
    instants, so a quote that simply comes true as time passes is not re-sent.
    """
    if last is None:
        return True
    if now - last.sent_at < interval:
        return False
    for before, after in ((last.p50_at, now + estimate.p50), (last.p90_at, now + estimate.p90)):
        if math.isinf(before) or math.isinf(after):
            if math.isinf(before) != math.isinf(after):
                return True
            continue
        if abs(after - before) > max(floor, fraction * (before - now)):
            return True
    return False


def quote(estimate: WaitEstimate, now: float) -> SentQuote:
    """What to remember of an estimate once it is sent."""
    return SentQuote(sent_at=now, p50_at=now + estimate.p50, p90_at=now + estimate.p90)
