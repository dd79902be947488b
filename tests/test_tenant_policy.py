"""The tenants' admission order, replayed as admission will run it (docs/admission.md "Tenants").

Pure Python: a model of the pool (capacity, live sessions, per-tenant FIFO queues) calls
``choose`` at every freed slot and every arrival, as the admission transaction will, and checks
every decision against the rules with its own bookkeeping.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from orchestrator.tenants import (
    Guarantee,
    TenantPolicy,
    TenantState,
    choose,
    effective_guarantees,
)

D_MAX = 100.0  # the longest a session lives (its expires_at)
AGING = 400.0
HORIZON = 30.0
TENANTS = ("a", "b", "c", "d")
EPS = 1e-6


@dataclass
class Pool:
    """Live sessions, waiting requests and the service used, per tenant."""

    capacity: int
    policies: dict[str, TenantPolicy]
    now: float = 0.0
    ends: list[tuple[float, int, str]] = field(default_factory=list)  # (end, seq, tenant)
    starts: dict[int, float] = field(default_factory=dict)  # seq -> start of a live session
    queues: dict[str, deque[float]] = field(default_factory=dict)  # arrival times, FIFO
    in_use: dict[str, int] = field(default_factory=dict)
    ended_seconds: dict[str, float] = field(default_factory=dict)
    live_starts: dict[str, float] = field(default_factory=dict)  # Σ start of live sessions
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def used(self, tenant: str) -> float:
        """Session-seconds since the start, live sessions counted up to now."""
        live = self.in_use.get(tenant, 0) * self.now - self.live_starts.get(tenant, 0.0)
        return self.ended_seconds.get(tenant, 0.0) + live

    def states(self) -> dict[str, TenantState]:
        out = {}
        for t in set(self.queues) | set(self.in_use):
            q = self.queues.get(t, deque())
            out[t] = TenantState(
                in_use=self.in_use.get(t, 0),
                waiting=len(q),
                oldest_since=q[0] if q else None,
                used_seconds=self.used(t),
            )
        return out

    def start(self, tenant: str, duration: float) -> None:
        seq = next(self.seq)
        self.starts[seq] = self.now
        self.in_use[tenant] = self.in_use.get(tenant, 0) + 1
        self.live_starts[tenant] = self.live_starts.get(tenant, 0.0) + self.now
        heapq.heappush(self.ends, (self.now + duration, seq, tenant))

    def end_next(self) -> str:
        end, seq, tenant = heapq.heappop(self.ends)
        started = self.starts.pop(seq)
        self.now = end
        self.in_use[tenant] -= 1
        self.live_starts[tenant] -= started
        self.ended_seconds[tenant] = self.ended_seconds.get(tenant, 0.0) + end - started
        return tenant

    def free(self) -> int:
        return self.capacity - sum(self.in_use.values())


def guarantees(pool: Pool) -> dict[str, Guarantee]:
    """The guarantees as the capacity honours them (shrunk when below their sum)."""
    return effective_guarantees(pool.capacity, pool.policies)


def holes(pool: Pool) -> dict[str, int]:
    """Unfilled non-lendable guarantees."""
    return {
        t: g.reserved - pool.in_use.get(t, 0)
        for t, g in guarantees(pool).items()
        if g.reserved > pool.in_use.get(t, 0)
    }


class TenantAdmission(RuleBasedStateMachine):
    """Random arrivals, session ends after random durations, and policy changes."""

    @initialize(
        capacity=st.integers(1, 8),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(self, capacity: int, seed: int) -> None:
        self.pool = Pool(capacity, {})
        self.rng = random.Random(seed)
        #: Since when each tenant has been backlogged below its guarantee (policy unchanged).
        self.below_since: dict[str, float] = {}

    # --- admission, as the wiring will run it ----------------------------------------------

    def admit(self) -> None:
        pool = self.pool
        while True:
            choice = choose(
                pool.capacity, pool.states(), pool.policies, pool.now, aging=AGING, horizon=HORIZON
            )
            self.check_no_choice_is_right(choice is None)
            if choice is None:
                return
            self.check_decision(choice.tenant, choice.reason)
            event(f"admitted by {choice.reason}")
            pool.queues[choice.tenant].popleft()
            pool.start(choice.tenant, self.rng.uniform(1.0, D_MAX))
            assert pool.free() >= 0, "the capacity is exceeded"
            policy = pool.policies.get(choice.tenant)
            if policy is not None and policy.maximum is not None:
                assert pool.in_use[choice.tenant] <= policy.maximum, "a maximum is exceeded"

    def allowed(self, tenant: str) -> bool:
        """May ``tenant`` take a slot now (its maximum, others' non-lendable guarantees)?"""
        pool = self.pool
        policy = pool.policies.get(tenant)
        in_use = pool.in_use.get(tenant, 0)
        if policy is not None and policy.maximum is not None and in_use >= policy.maximum:
            return False
        h = holes(pool)
        return pool.free() >= 1 if h.get(tenant, 0) > 0 else pool.free() - 1 >= sum(h.values())

    def backlogged(self) -> list[str]:
        return [t for t, q in self.pool.queues.items() if q]

    def check_no_choice_is_right(self, none: bool) -> None:
        if none:
            allowed = [t for t in self.backlogged() if self.allowed(t)]
            assert self.pool.free() <= 0 or not allowed, f"a slot stays free for {allowed}"

    def check_decision(self, tenant: str, reason: str) -> None:
        pool = self.pool
        assert tenant in self.backlogged()
        assert pool.free() >= 1, "the capacity would be exceeded"
        policy = pool.policies.get(tenant)
        if policy is not None and policy.maximum is not None:
            assert pool.in_use.get(tenant, 0) < policy.maximum, f"{tenant}'s maximum is exceeded"
        assert self.allowed(tenant), f"{tenant} took a slot kept as another's non-lendable part"
        h = holes(pool)
        waiting_holes = [t for t in self.backlogged() if h.get(t, 0) > 0]
        if waiting_holes:
            assert tenant in waiting_holes, "a non-lendable guarantee was lent"
            return
        below = {
            t: g.guaranteed - pool.in_use.get(t, 0)
            for t, g in guarantees(pool).items()
            if t in self.backlogged() and pool.in_use.get(t, 0) < g.guaranteed
        }
        if below:
            assert tenant in below and below[tenant] == max(below.values()), (
                f"{tenant} got the slot while {below} are below their guarantee"
            )
            return
        aged = [
            pool.queues[t][0]
            for t in self.backlogged()
            if self.allowed(t) and pool.now - pool.queues[t][0] >= AGING
        ]
        if aged:
            assert reason == "aged" and pool.queues[tenant][0] == min(aged), (
                "an aged request was overtaken"
            )

    # --- rules ------------------------------------------------------------------------------

    @rule(tenant=st.sampled_from(TENANTS), count=st.integers(1, 6))
    def arrive(self, tenant: str, count: int) -> None:
        self.pool.queues.setdefault(tenant, deque()).extend([self.pool.now] * count)
        self.admit()

    @rule(dt=st.floats(0.5, 3 * D_MAX))
    def advance(self, dt: float) -> None:
        pool = self.pool
        until = pool.now + dt
        while pool.ends and pool.ends[0][0] <= until:
            self.track_guarantees(pool.ends[0][0])
            pool.end_next()
            self.admit()
        self.track_guarantees(until)
        pool.now = until

    @rule(
        tenant=st.sampled_from(TENANTS),
        guaranteed=st.integers(0, 4),
        extra=st.none() | st.integers(0, 4),
        weight=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
        reserved_share=st.integers(0, 2),
    )
    def set_policy(
        self, tenant: str, guaranteed: int, extra: int | None, weight: float, reserved_share: int
    ) -> None:
        pool = self.pool
        maximum = None if extra is None else max(guaranteed + extra, 1)
        pool.policies[tenant] = TenantPolicy(
            tenant,
            guaranteed=guaranteed,
            maximum=maximum,
            weight=weight,
            reserved=guaranteed * reserved_share // 2,
        )
        self.below_since.clear()  # the guarantee's clock restarts with the new policies
        self.admit()

    @rule(capacity=st.integers(0, 8))
    def set_capacity(self, capacity: int) -> None:
        """A vendor limit lowered or raised, an account unhealthy: nothing live is stopped."""
        self.pool.capacity = capacity
        self.below_since.clear()
        self.admit()

    # --- the guarantee's time bound ---------------------------------------------------------

    def track_guarantees(self, at: float) -> None:
        """A tenant backlogged below its guarantee reaches it within one maximum session."""
        pool = self.pool
        for t, g in guarantees(pool).items():
            below = bool(pool.queues.get(t)) and pool.in_use.get(t, 0) < g.guaranteed
            if not below:
                self.below_since.pop(t, None)
                continue
            since = self.below_since.setdefault(t, pool.now)
            assert at - since <= D_MAX + EPS, (
                f"{t} stayed below its guarantee for {at - since:.1f}s (bound {D_MAX})"
            )

    @invariant()
    def settled(self) -> None:
        if hasattr(self, "pool"):
            self.check_no_choice_is_right(True)
            for t, g in guarantees(self.pool).items():
                if self.pool.queues.get(t) and self.pool.in_use.get(t, 0) < g.reserved:
                    assert self.pool.free() <= 0, f"{t}'s non-lendable slot is not given to it"


TenantAdmission.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_tenant_admission = TenantAdmission.TestCase


# --- fair sharing over a long run ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 12),
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0]), min_size=2, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(["uniform", "short-long", "exponential"]),
)
def test_live_slot_shares_follow_the_weights_within_the_bound(
    capacity: int, weights: list[float], seed: int, shape: str
) -> None:
    """Every tenant stays backlogged; over the run, for every pair t, u and at every end:

    used_t / w_t - used_u / w_u  <=  (H + n_t * D) / w_t  +  H * n_u / w_u

    (n: the most slots the tenant held). The service shares converge to the weights.
    """
    rng = random.Random(seed)
    names = [f"t{i}" for i in range(len(weights))]
    policies = {n: TenantPolicy(n, weight=w) for n, w in zip(names, weights, strict=True)}
    pool = Pool(capacity, policies)
    for n in names:
        pool.queues[n] = deque([0.0] * 1_000_000)

    def duration() -> float:
        if shape == "uniform":
            return rng.uniform(1.0, D_MAX)
        if shape == "short-long":
            return 2.0 if rng.random() < 0.8 else D_MAX
        return min(D_MAX, rng.expovariate(1 / 20))

    peak = dict.fromkeys(names, 0)

    def admit() -> None:
        while (
            c := choose(
                capacity, pool.states(), policies, pool.now, aging=math.inf, horizon=HORIZON
            )
        ) is not None:
            pool.queues[c.tenant].popleft()
            pool.start(c.tenant, duration())
            peak[c.tenant] = max(peak[c.tenant], pool.in_use[c.tenant])

    admit()
    run = 60 * D_MAX
    while pool.now < run:
        pool.end_next()
        admit()
        for t, u in itertools.permutations(names, 2):
            wt, wu = policies[t].weight, policies[u].weight
            gap = pool.used(t) / wt - pool.used(u) / wu
            bound = (HORIZON + peak[t] * D_MAX) / wt + HORIZON * peak[u] / wu
            assert gap <= bound + EPS, f"{t} is ahead of {u} by {gap:.0f} > {bound:.0f}"
    total = sum(pool.used(n) for n in names)
    for n in names:
        share, fair = pool.used(n) / total, policies[n].weight / sum(weights)
        if capacity * fair >= 1:  # a share below one slot cannot be met without preemption
            assert abs(share - fair) <= 0.1, f"{n}: share {share:.2f}, weight share {fair:.2f}"
