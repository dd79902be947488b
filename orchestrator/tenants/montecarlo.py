"""One draw of the future, for the wait estimate: when every live session ends, who arrives,
and who gets each freed slot.

Each run draws every live session's end from its tenant's recent lengths (conditioned on the
time it has already lived, capped at its ``expires_at``), draws later arrivals of every tenant
at its recent rate, and hands each freed slot out by the policy's ranks: a tenant below its
guarantee first, never one at its maximum, then the oldest aged request, then fair sharing.
Fair sharing is replayed on each tenant's charge (``choice.charge``), booked when a slot is
given rather than by the second: a session given a slot adds the seconds it will use over its
tenant's weight (its drawn length), a live session the seconds it has left minus the horizon
already charged for it. One heap of backlogged tenants: a slot costs O(log tenants), a run
O((waiters + arrivals + live) log).
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from orchestrator.tenants.choice import TenantState, charge
from orchestrator.tenants.policy import effective_guarantees, policy_for

if TYPE_CHECKING:
    from orchestrator.tenants.estimate import LiveSession, Pool

FUTURE: Final = -1  # a queue entry for a request that has not arrived yet
MAX_RATE: Final = 100.0  # arrivals per second per tenant; a higher rate is read as this one


class Lengths:
    """Session lengths from each tenant's recent ones (everyone's when it has few)."""

    MIN_SAMPLE: Final = 5

    def __init__(self, durations: Mapping[str, Sequence[float]], max_duration: float) -> None:
        clean = {
            t: sorted(min(max(d, 0.0), max_duration) for d in ds if math.isfinite(d))
            for t, ds in durations.items()
        }
        everyone = sorted(d for ds in clean.values() for d in ds)
        self.pooled = everyone or [max_duration]
        self.by_tenant = {t: ds for t, ds in clean.items() if len(ds) >= self.MIN_SAMPLE}
        self.means = {t: sum(ds) / len(ds) for t, ds in self.by_tenant.items()}
        self.pooled_mean = sum(self.pooled) / len(self.pooled)

    def sample(self, tenant: str) -> list[float]:
        return self.by_tenant.get(tenant, self.pooled)

    def mean(self, tenant: str) -> float:
        return self.means.get(tenant, self.pooled_mean)

    def end(self, s: LiveSession, now: float, rng: random.Random) -> float:
        """When a live session ends: a length longer than it has lived, capped at its expiry."""
        sample = self.sample(s.tenant)
        longer = bisect.bisect_right(sample, now - s.started_at)
        if longer >= len(sample):
            return max(now, s.expires_at)  # it outlived every recent session: its expiry
        length = sample[longer + int(rng.random() * (len(sample) - longer))]
        return max(now, min(s.started_at + length, s.expires_at))


class Runs:
    """What every run shares: the queues, policies, starting tags and lengths."""

    def __init__(self, pool: Pool, lengths: Lengths, *, aging: float, horizon: float) -> None:
        self.pool, self.lengths, self.aging = pool, lengths, aging
        self.queues: dict[str, list[int]] = {}
        for i in sorted(range(len(pool.waiters)), key=lambda i: pool.waiters[i].since):
            self.queues.setdefault(pool.waiters[i].tenant, []).append(i)
        self.in_use: dict[str, int] = {}
        for s in pool.live:
            self.in_use[s.tenant] = self.in_use.get(s.tenant, 0) + 1
        rates = pool.arrival_rates or {}
        self.rates = {t: min(r, MAX_RATE) for t, r in rates.items() if math.isfinite(r) and r > 0}
        tenants = set(self.queues) | set(self.in_use) | set(self.rates)
        self.policies = {t: policy_for(pool.policies, t) for t in tenants}
        guarantees = effective_guarantees(pool.capacity, pool.policies)
        self.guaranteed = {t: g.guaranteed for t, g in guarantees.items()}
        usage = pool.usage or {}
        self.tags = {
            t: charge(
                TenantState(in_use=self.in_use.get(t, 0), used_seconds=usage.get(t, 0.0)),
                self.policies[t],
                horizon,
            )
            for t in tenants
        }
        self.horizon = horizon
        self.maximum = {t: p.maximum for t, p in self.policies.items()}
        self.weight = {t: p.weight for t, p in self.policies.items()}
        self.since = [w.since for w in pool.waiters]
        kept = sum(max(0, g.reserved - self.in_use.get(t, 0)) for t, g in guarantees.items())
        self.free = max(0, pool.capacity - len(pool.live) - kept)

    def regained(self, tenant: str, in_use: int) -> bool:
        """Whether one end moved the tenant's rank: off its maximum, or below its guarantee."""
        maximum = self.policies[tenant].maximum
        return in_use + 1 == maximum or in_use < self.guaranteed.get(tenant, 0)

    def run(self, rng: random.Random, until: float) -> list[float]:
        """One draw of every waiter's wait (``math.inf`` if not admitted by ``until``)."""
        return _Run(self, rng).waits_until(until)


class _Run:
    """The state of one run: slots by end time, arrivals, queues, charges, the ranked heap."""

    def __init__(self, shared: Runs, rng: random.Random) -> None:
        self.shared, self.rng, self.now = shared, rng, shared.pool.now
        self.slots = [(shared.lengths.end(s, self.now, rng), s.tenant) for s in shared.pool.live]
        self.in_use, self.tags = dict(shared.in_use), dict(shared.tags)
        for end, tenant in self.slots:  # what a live session will use beyond its charge
            self.tags[tenant] += (end - self.now - shared.horizon) / shared.weight[tenant]
        self.slots += [(self.now, "")] * shared.free
        heapq.heapify(self.slots)
        self.arrivals = [(self.now + rng.expovariate(r), t) for t, r in shared.rates.items()]
        heapq.heapify(self.arrivals)
        self.queues = {t: deque(q) for t, q in shared.queues.items()}
        self.version: dict[str, int] = {}
        self.ranked: list[tuple[int, float, float, str, int]] = []
        self.waits = [math.inf] * len(shared.pool.waiters)
        self.left = len(shared.pool.waiters)
        for tenant in self.queues:
            self.rank(tenant, self.now)

    def waits_until(self, until: float) -> list[float]:
        while self.slots and self.left:
            at, freed = heapq.heappop(self.slots)
            if at > until:
                break
            self.arrive(at)
            if freed:
                self.in_use[freed] -= 1
                if self.queues.get(freed) and self.shared.regained(freed, self.in_use[freed]):
                    self.rank(freed, at)
            self.give(at)
        return self.waits

    def rank(self, tenant: str, at: float) -> None:
        """(Re)place a backlogged tenant in the heap, unless it is at its maximum."""
        shared = self.shared
        maximum = shared.maximum[tenant]
        used = self.in_use.get(tenant, 0)
        if maximum is not None and used >= maximum:
            return
        head = self.queues[tenant][0]
        since = shared.since[head] if head != FUTURE else at
        below = used - shared.guaranteed.get(tenant, 0)
        if below < 0:
            key: tuple[int, float, float] = (1, below, since)
        elif at - since >= shared.aging:
            key = (2, since, 0.0)
        else:
            key = (3, self.tags[tenant], since)
        self.version[tenant] = self.version.get(tenant, 0) + 1
        heapq.heappush(self.ranked, (*key, tenant, self.version[tenant]))

    def arrive(self, at: float) -> None:
        """Requests not here yet that arrive by ``at`` join their tenant's queue."""
        while self.arrivals and self.arrivals[0][0] <= at:
            came, tenant = heapq.heappop(self.arrivals)
            rate = self.shared.rates[tenant]
            heapq.heappush(self.arrivals, (came + self.rng.expovariate(rate), tenant))
            queue = self.queues.setdefault(tenant, deque())
            queue.append(FUTURE)
            if len(queue) == 1:
                self.rank(tenant, came)

    def give(self, at: float) -> None:
        """The slot freed at ``at`` goes to the best-ranked tenant's oldest request."""
        ranked, version, queues = self.ranked, self.version, self.queues
        while ranked:
            entry = heapq.heappop(ranked)
            tenant = entry[3]
            if entry[4] == version.get(tenant) and queues.get(tenant):
                break
        else:
            return  # nobody may take this slot: it stays free until the next end
        queue = queues[tenant]
        head = queue.popleft()
        if head != FUTURE:
            self.waits[head] = at - self.now
            self.left -= 1
        self.in_use[tenant] = self.in_use.get(tenant, 0) + 1
        sample = self.shared.lengths.sample(tenant)
        length = sample[int(self.rng.random() * len(sample))]
        self.tags[tenant] += length / self.shared.weight[tenant]
        heapq.heappush(self.slots, (at + length, tenant))
        if queue:
            self.rank(tenant, at)
