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

import bisect
import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from orchestrator.tenants.choice import TenantState, charge
from orchestrator.tenants.policy import (
    Guarantee,
    TenantPolicy,
    effective_guarantees,
    policy_for,
)

#: The quantile quoted as "p90". Slightly above 0.9: the runs' p90 is itself an estimate from
#: a finite sample, and the model leaves out fair-share arrivals that overtake; tuned on
#: lognormal traces (tests/test_wait_estimate.py judges it on Weibull and gamma mixtures).
P90_LEVEL: Final = 0.93
#: The quantile quoted as "p50" (tuned with P90_LEVEL).
P50_LEVEL: Final = 0.5


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
    #: Recent arrivals per second, per tenant (only tenants with a guarantee are read).
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
) -> list[WaitEstimate]:
    """Position and p50/p90 wait of every waiting request, in admission order.

    A wait that no run could end (no capacity at all) is ``math.inf``.
    """
    if not pool.waiters:
        return []
    order = admission_order(pool, aging=aging, horizon=horizon)
    lengths = _Lengths(pool.durations, pool.max_duration)
    rng = random.Random(seed)
    every = _Runs(pool, order, lengths)
    draws = [every.run(rng) for _ in range(max(1, runs))]
    out = []
    for k, i in enumerate(order):
        sample = sorted(d[k] for d in draws)
        out.append(
            WaitEstimate(
                request_id=pool.waiters[i].request_id,
                position=k + 1,
                p50=_quantile(sample, p50_level),
                p90=_quantile(sample, p90_level),
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


class _Lengths:
    """Draws a session's length from its tenant's recent lengths (everyone's when it has few)."""

    MIN_SAMPLE: Final = 5

    def __init__(self, durations: Mapping[str, Sequence[float]], max_duration: float) -> None:
        self.max_duration = max_duration
        clean = {
            t: sorted(min(max(d, 0.0), max_duration) for d in ds if math.isfinite(d))
            for t, ds in durations.items()
        }
        everyone = sorted(d for ds in clean.values() for d in ds)
        self.pooled = everyone or [max_duration]
        self.by_tenant = {t: ds for t, ds in clean.items() if len(ds) >= self.MIN_SAMPLE}

    def sample(self, tenant: str) -> list[float]:
        return self.by_tenant.get(tenant, self.pooled)

    def new(self, tenant: str, rng: random.Random) -> float:
        sample = self.sample(tenant)
        return sample[int(rng.random() * len(sample))]

    def remaining(self, s: LiveSession, now: float, rng: random.Random) -> float:
        """When a live session ends: a length longer than it has lived, capped at its expiry."""
        sample = self.sample(s.tenant)
        lived = now - s.started_at
        longer = bisect.bisect_right(sample, lived)
        if longer >= len(sample):
            return max(now, s.expires_at)  # it outlived every recent session: its expiry
        length = sample[longer + int(rng.random() * (len(sample) - longer))]
        return max(now, min(s.started_at + length, s.expires_at))


class _Runs:
    """What every run shares (the order, each waiter's tenant, maximum and lengths)."""

    def __init__(self, pool: Pool, order: list[int], lengths: _Lengths) -> None:
        self.pool = pool
        self.lengths = lengths
        self.tenants = [pool.waiters[i].tenant for i in order]
        self.maximum = {t: policy_for(pool.policies, t).maximum for t in set(self.tenants)}
        self.guarantees = effective_guarantees(pool.capacity, pool.policies)
        self.in_use: dict[str, int] = {}
        for s in pool.live:
            self.in_use[s.tenant] = self.in_use.get(s.tenant, 0) + 1
        kept = sum(max(0, g.reserved - self.in_use.get(t, 0)) for t, g in self.guarantees.items())
        self.free = max(0, pool.capacity - len(pool.live) - kept)

    def run(self, rng: random.Random) -> list[float]:
        """One draw of every waiter's wait, indexed like the order."""
        pool, lengths, tenants, maximum = self.pool, self.lengths, self.tenants, self.maximum
        now, draw, push, pop = pool.now, rng.random, heapq.heappush, heapq.heappop
        slots = [(lengths.remaining(s, now, rng), s.tenant) for s in pool.live]
        slots += [(now, "")] * self.free
        heapq.heapify(slots)
        in_use = dict(self.in_use)
        overtakers = _overtakers(pool, self.guarantees, in_use, rng)
        waits = [math.inf] * len(tenants)
        deferred: dict[str, list[int]] = {}  # positions held back by their tenant's maximum
        ready: list[int] = []  # held-back positions whose tenant has room again
        nxt = held = 0
        while slots and (nxt < len(tenants) or held or ready):
            at, freed = pop(slots)
            if freed:
                in_use[freed] -= 1
                if deferred.get(freed):
                    push(ready, deferred[freed].pop(0))
                    held -= 1
            if overtakers and overtakers[0][0] <= at:
                _, tenant = pop(overtakers)
                in_use[tenant] = in_use.get(tenant, 0) + 1
                push(slots, (at + lengths.new(tenant, rng), tenant))
                continue
            while nxt < len(tenants):
                cap = maximum[tenants[nxt]]
                if cap is None or in_use.get(tenants[nxt], 0) < cap:
                    break
                deferred.setdefault(tenants[nxt], []).append(nxt)
                held += 1
                nxt += 1
            if ready and (nxt >= len(tenants) or ready[0] < nxt):
                k = pop(ready)
            elif nxt < len(tenants):
                k, nxt = nxt, nxt + 1
            else:
                continue  # every waiter left is held by its maximum: this slot stays free
            tenant = tenants[k]
            waits[k] = at - now
            in_use[tenant] = in_use.get(tenant, 0) + 1
            sample = lengths.sample(tenant)
            push(slots, (at + sample[int(draw() * len(sample))], tenant))
        return waits


def _overtakers(
    pool: Pool, guarantees: Mapping[str, Guarantee], in_use: Mapping[str, int], rng: random.Random
) -> list[tuple[float, str]]:
    """Arrival times of requests, not here yet, that will go before every waiter: tenants
    below their guarantee arriving at their recent rate, up to their unused guarantee."""
    rates = pool.arrival_rates or {}
    waiting: dict[str, int] = {}
    for w in pool.waiters:
        waiting[w.tenant] = waiting.get(w.tenant, 0) + 1
    out: list[tuple[float, str]] = []
    for tenant, g in guarantees.items():
        rate = rates.get(tenant, 0.0)
        room = g.guaranteed - in_use.get(tenant, 0) - waiting.get(tenant, 0)
        if not (rate > 0 and math.isfinite(rate)) or room <= 0:
            continue
        at = pool.now
        for _ in range(room):
            at += rng.expovariate(rate)
            out.append((at, tenant))
    heapq.heapify(out)
    return out


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
        if abs(after - before) > fraction * max(floor, before - now):
            return True
    return False


def quote(estimate: WaitEstimate, now: float) -> SentQuote:
    """What to remember of an estimate once it is sent."""
    return SentQuote(sent_at=now, p50_at=now + estimate.p50, p90_at=now + estimate.p90)
