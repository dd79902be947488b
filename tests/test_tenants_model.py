"""The tenants' admission order (docs/admission.md "What the order guarantees") held by the
real store on real Postgres: a Hypothesis state machine drives the claim, the end path,
``admit`` and ``set_policy`` over two accounts and checks every step against the rules, and
long seeded runs of backlogged tenants check fair sharing against its bound.

Time is the database's: a step that lets ``dt`` seconds pass moves every timestamp the
decision reads (the rows' arrival and admission, the usage rows' decay clock) back by ``dt``,
as if they had been written ``dt`` earlier. Nothing of ours is patched."""

from __future__ import annotations

import itertools
import math
import random
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

from orchestrator import store
from orchestrator.db import Database
from orchestrator.store.ending import end
from orchestrator.store.rows import S
from orchestrator.store.tenant_order import AGING_SECONDS, HORIZON_SECONDS
from orchestrator.store.tenants import set_policy, tenant_drift
from orchestrator.tenants import TenantPolicy
from tests.conftest import empty
from tests.helpers import claim_request, only_accounts
from tests.test_tenants_counters import CAPS

pytestmark = pytest.mark.postgres

CAPACITY = sum(CAPS.values())
#: Tenants that may be given a guarantee (their requests name no account, so every freed
#: slot may serve them) and tenants whose requests may name an account.
GUARANTEED = ("gold", "silver")
OTHERS = ("bulk", "default")


def open_pool(db: Database) -> None:
    """The database emptied, accounts ``a`` and ``b`` the only ones that admit."""
    empty(db)
    only_accounts(db, CAPS)


def let_time_pass(db: Database, seconds: float) -> None:
    """Every timestamp admission reads, ``seconds`` earlier: as if that much time passed
    (ended rows are charged already; admission reads none of theirs)."""
    shift = {"dt": seconds}
    with db.transaction() as session:
        session.execute(
            text(
                "UPDATE sessions SET created_at = created_at - make_interval(secs => :dt),"
                " admitted_at = admitted_at - make_interval(secs => :dt),"
                " start_sent_at = start_sent_at - make_interval(secs => :dt),"
                " started_at = started_at - make_interval(secs => :dt)"
                " WHERE status IN ('waiting', 'starting', 'active', 'stopping')"
            ),
            shift,
        )
        session.execute(
            text("UPDATE tenant_account_usage SET used_at = used_at - make_interval(secs => :dt)"),
            shift,
        )


@dataclass(frozen=True)
class Waiting:
    id: uuid.UUID
    tenant: str
    account: str | None
    age: float  # seconds, by the database's clock


@dataclass(frozen=True)
class Snapshot:
    """Live sessions (id → (tenant, account)) and waiting requests, one read."""

    live: dict[uuid.UUID, tuple[str, str]]
    waiting: list[Waiting]

    def live_of(self, tenant: str) -> int:
        return sum(1 for t, _ in self.live.values() if t == tenant)

    def live_on(self, account: str) -> int:
        return sum(1 for _, a in self.live.values() if a == account)

    def eligible(self, account: str) -> list[Waiting]:
        """The waiting requests ``account`` may serve, oldest first."""
        found = [w for w in self.waiting if w.account in (None, account)]
        return sorted(found, key=lambda w: (-w.age, w.id))


def snapshot(db: Database) -> Snapshot:
    with db.transaction() as session:
        rows = session.execute(
            text(
                "SELECT id, tenant, account, status,"
                " extract(epoch FROM now() - created_at) AS age FROM sessions"
                " WHERE status IN ('waiting', 'starting', 'active', 'stopping')"
                " ORDER BY created_at, request_id"
            )
        ).all()
    return Snapshot(
        live={r.id: (r.tenant, r.account) for r in rows if r.status != "waiting"},
        waiting=[
            Waiting(r.id, r.tenant, r.account, float(r.age)) for r in rows if r.status == "waiting"
        ],
    )


class TenantAdmissionOnPostgres(RuleBasedStateMachine):
    """Arrivals (some naming an account), ends, ``admit``, policy changes and time passing;
    the service's reactions as it makes them: a freed slot admits on its account, a request
    that waits wakes every open account."""

    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db
        open_pool(db)
        self.policies: dict[str, TenantPolicy] = {}
        self.serial = itertools.count()
        self.before = snapshot(db)
        #: Per tenant backlogged below its guarantee: the sessions live when it fell behind.
        self.behind: dict[str, set[uuid.UUID]] = {}

    # --- the policies the checks read ------------------------------------------------------

    def policy(self, tenant: str) -> TenantPolicy:
        return self.policies.get(tenant, TenantPolicy(name=tenant))

    def room(self, tenant: str, live: int) -> float:
        maximum = self.policy(tenant).maximum
        return math.inf if maximum is None else max(0, maximum - live)

    def holes(self, snap: Snapshot) -> dict[str, int]:
        """Unfilled non-lendable parts (the guarantees fit the capacity: none shrinks)."""
        return {
            t: p.reserved - snap.live_of(t)
            for t, p in self.policies.items()
            if p.reserved > snap.live_of(t)
        }

    # --- admission, checked decision by decision --------------------------------------------

    def admit(self, account: str) -> None:
        before = snapshot(self.db)
        admitted = [i for i, _ in store.admit(self.db, account=account)]
        after = snapshot(self.db)
        waiting = {w.id: w for w in before.waiting}
        assert all(i in waiting for i in admitted), "admitted a request that was not waiting"
        assert all(waiting[i].account in (None, account) for i in admitted), "wrong account"
        given: dict[str, int] = {}
        for i in admitted:
            given[waiting[i].tenant] = given.get(waiting[i].tenant, 0) + 1
        eligible = before.eligible(account)
        by_tenant: dict[str, list[Waiting]] = {}
        for w in eligible:
            by_tenant.setdefault(w.tenant, []).append(w)
        # First in first out within a tenant: each tenant's oldest eligible requests went.
        for tenant, n in given.items():
            assert {w.id for w in by_tenant[tenant][:n]} == {
                i for i in admitted if waiting[i].tenant == tenant
            }, f"{tenant}'s requests were not admitted oldest first"
        self.check_the_reserved_and_guaranteed_slots(before, by_tenant, given, len(admitted))
        self.check_aging(before, eligible, given, admitted)
        self.check_no_slot_idles(after, account)

    def check_the_reserved_and_guaranteed_slots(
        self,
        before: Snapshot,
        by_tenant: dict[str, list[Waiting]],
        given: dict[str, int],
        k: int,
    ) -> None:
        """Slots go to unfilled reservations first, then to tenants below their guarantee:
        as many as those tenants could take, of the ``k`` given."""
        for part in ("reserved", "guaranteed"):
            deficit = {
                t: getattr(p, part) - before.live_of(t)
                for t, p in self.policies.items()
                if getattr(p, part) > before.live_of(t)
            }
            could = sum(
                min(len(by_tenant.get(t, [])), d, self.room(t, before.live_of(t)))
                for t, d in deficit.items()
            )
            got = sum(min(given.get(t, 0), d) for t, d in deficit.items())
            assert got >= min(k, could), (
                f"{k} slot(s) given as {given} while {deficit} were below their {part} part"
            )

    def check_aging(
        self,
        before: Snapshot,
        eligible: list[Waiting],
        given: dict[str, int],
        admitted: list[uuid.UUID],
    ) -> None:
        """A slot that no guarantee took goes to the oldest aged request its maximum allows."""
        if self.holes(before):
            return  # kept slots decide who may take one; the aged rule is not alone
        deficits = {
            t: p.guaranteed - before.live_of(t)
            for t, p in self.policies.items()
            if p.guaranteed > before.live_of(t)
        }
        guaranteed = sum(min(given.get(t, 0), d) for t, d in deficits.items())
        if guaranteed >= len(admitted):
            return
        aged = [
            w
            for w in eligible
            if w.age >= AGING_SECONDS + 1 and self.room(w.tenant, before.live_of(w.tenant)) > 0
        ]
        if aged:
            assert aged[0].id in admitted, (
                f"{aged[0].tenant}'s request aged {aged[0].age:.0f}s was passed over: {given}"
            )

    def check_no_slot_idles(self, after: Snapshot, account: str) -> None:
        """After ``admit``, the account's free slots are kept only for a maximum or for
        another tenant's unfilled non-lendable part."""
        if after.live_on(account) >= CAPS[account]:
            return
        holes = self.holes(after)
        pool_free = CAPACITY - len(after.live)
        for w in after.eligible(account):
            if self.room(w.tenant, after.live_of(w.tenant)) <= 0:
                continue
            own = holes.get(w.tenant, 0)
            assert not (own > 0 or pool_free - 1 >= sum(holes.values())), (
                f"a slot of {account} idles while {w.tenant} waits ({holes=})"
            )

    def wake_every_account(self) -> None:
        for account in CAPS:
            self.admit(account)

    # --- rules -----------------------------------------------------------------------------

    @initialize(
        guaranteed=st.tuples(st.integers(0, 4), st.integers(0, 3)),
        reserved_half=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    )
    def guarantees_from_the_start(
        self, guaranteed: tuple[int, int], reserved_half: tuple[int, int]
    ) -> None:
        """Both guaranteed tenants start with a policy: reservations and guarantees compete."""
        for tenant, g, r in zip(GUARANTEED, guaranteed, reserved_half, strict=True):
            self.change_policy(tenant, g, None, 1.0, r)

    @rule(tenant=st.sampled_from(GUARANTEED), count=st.integers(1, 4))
    def arrive_anywhere(self, tenant: str, count: int) -> None:
        self.arrive(tenant, count, None)

    @rule(
        tenant=st.sampled_from(OTHERS),
        count=st.integers(1, 4),
        account=st.sampled_from([None, "a", "b"]),
    )
    def arrive(self, tenant: str, count: int, account: str | None) -> None:
        waits = False
        for _ in range(count):
            wish = {} if account is None else {"account": account}
            claimed = claim_request(self.db, f"r{next(self.serial)}", tenant=tenant, **wish)
            waits = waits or claimed.status == "waiting"
        if waits:
            self.wake_every_account()

    @precondition(lambda self: bool(self.before.live))
    @rule(pick=st.integers(0, 10**6))
    def end_one(self, pick: int) -> None:
        live = list(self.before.live)  # in arrival order: the same steps pick the same one
        chosen = live[pick % len(live)]
        with self.db.transaction() as session:
            end(session, [chosen], S.ENDED, from_statuses=[S.STARTING])
        self.admit(self.before.live[chosen][1])

    @rule(account=st.sampled_from(sorted(CAPS)))
    def admit_account(self, account: str) -> None:
        self.admit(account)

    @rule(seconds=st.sampled_from([30.0, 300.0, 1000.0]))
    def time_passes(self, seconds: float) -> None:
        let_time_pass(self.db, seconds)

    @rule(
        tenant=st.sampled_from([*GUARANTEED, "bulk"]),
        guaranteed=st.integers(0, 4),
        extra=st.none() | st.integers(0, 3),
        weight=st.sampled_from([0.5, 1.0, 3.0]),
        reserved_half=st.integers(0, 2),
    )
    def change_policy(
        self, tenant: str, guaranteed: int, extra: int | None, weight: float, reserved_half: int
    ) -> None:
        if tenant not in GUARANTEED:
            guaranteed = 0
        others = sum(p.guaranteed for t, p in self.policies.items() if t != tenant)
        guaranteed = min(guaranteed, CAPACITY - others)  # the guarantees fit the capacity
        policy = TenantPolicy(
            name=tenant,
            guaranteed=guaranteed,
            maximum=None if extra is None else max(1, guaranteed + extra),
            weight=weight,
            reserved=guaranteed * reserved_half // 2,
        )
        set_policy(self.db, policy)
        self.policies[tenant] = policy
        self.behind.clear()  # the guarantees' clock restarts with the new policies

    # --- after every step ------------------------------------------------------------------

    @invariant()
    def caps_maximums_counters_and_the_guarantees_bound(self) -> None:
        now = snapshot(self.db)
        for account, cap in CAPS.items():
            assert now.live_on(account) <= cap, f"{account}'s cap is exceeded"
        for tenant in {t for t, _ in now.live.values()}:
            maximum = self.policy(tenant).maximum
            # Lowering a maximum stops nothing; a tenant at or above it gains no slot.
            limit = max(maximum, self.before.live_of(tenant)) if maximum is not None else None
            assert limit is None or now.live_of(tenant) <= limit, f"{tenant}'s maximum exceeded"
        assert tenant_drift(self.db) == []
        assert store.drift(self.db) == []
        self.track_the_guarantees(now)
        self.before = now

    def track_the_guarantees(self, now: Snapshot) -> None:
        """A tenant backlogged below its guarantee reaches it by the time every session live
        when it fell behind has ended (the bound D, counted in sessions)."""
        for tenant, policy in self.policies.items():
            backlogged = any(w.tenant == tenant for w in now.waiting)
            if not backlogged or now.live_of(tenant) >= policy.guaranteed:
                self.behind.pop(tenant, None)
                continue
            since = self.behind.setdefault(tenant, set(now.live))
            assert since & set(now.live), (
                f"{tenant} is still below its guarantee ({now.live_of(tenant)} of"
                f" {policy.guaranteed}) after every session live when it fell behind ended"
            )


def test_admission_on_postgres_keeps_the_tenants_order(db: Database) -> None:
    run_state_machine_as_test(
        lambda: TenantAdmissionOnPostgres(db),
        settings=settings(
            max_examples=20,
            stateful_step_count=35,
            deadline=None,
            # No shrinking: each of its runs is a whole schedule on Postgres, and hundreds of
            # them outlast the test's bound; a failure prints its (short) steps as found.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# --- fair sharing over long runs ---------------------------------------------------------------

D_SECONDS = 120.0  # the longest session of these runs
QUEUE = 2  # requests each tenant keeps waiting (it stays backlogged, none ages)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_backlogged_tenants_service_follows_the_weights_within_the_bound(
    db: Database, seed: int
) -> None:
    """Three tenants with random weights stay backlogged on two accounts; sessions of random
    lengths end in order of their end. At every end, for every pair t, u (S: session-seconds
    received since the start, n: the most slots held):

    S_t / w_t - S_u / w_u  <=  (H + n_t * D) / w_t  +  H * n_u / w_u

    and at the end each tenant's share of the session-seconds is within 0.05 of its weight's.
    """
    rng = random.Random(seed)
    open_pool(db)
    weights = {f"t{i}": rng.choice([0.5, 1.0, 2.0, 3.0]) for i in range(3)}
    for name, weight in weights.items():
        set_policy(db, TenantPolicy(name=name, weight=weight))
    serial = itertools.count()
    clock = 0.0
    ends: dict[uuid.UUID, tuple[float, float, str, str]] = {}  # id → end, start, tenant, account
    received = dict.fromkeys(weights, 0.0)  # session-seconds of ended sessions
    peak = dict.fromkeys(weights, 0)

    def started_and_refilled(ids: list[uuid.UUID]) -> None:
        """The admitted sessions' ends drawn; each tenant's queue topped up to QUEUE."""
        now = snapshot(db)
        for i in ids:
            tenant, account = now.live[i]
            ends[i] = (clock + rng.uniform(1.0, D_SECONDS), clock, tenant, account)
        for name in weights:
            peak[name] = max(peak[name], sum(1 for e in ends.values() if e[2] == name))
            for _ in range(QUEUE - sum(1 for w in now.waiting if w.tenant == name)):
                claim_request(db, f"{name}-{next(serial)}", tenant=name)
        assert max(w.age for w in now.waiting) < AGING_SECONDS  # the share decides, not age

    for _ in range(3):  # the pool fills in turn, then each keeps QUEUE waiting
        for name in weights:
            claim_request(db, f"{name}-{next(serial)}", tenant=name)
    started_and_refilled(list(snapshot(db).live))
    while clock < 2400.0:
        chosen = min(ends, key=lambda i: ends[i][0])
        finish, begun, tenant, account = ends.pop(chosen)
        let_time_pass(db, finish - clock)
        clock = finish
        with db.transaction() as session:
            end(session, [chosen], S.ENDED, from_statuses=[S.STARTING])
        received[tenant] += finish - begun
        started_and_refilled([i for i, _ in store.admit(db, account=account)])
        used = {
            n: received[n] + sum(clock - e[1] for e in ends.values() if e[2] == n) for n in weights
        }
        for t, u in itertools.permutations(weights, 2):
            gap = used[t] / weights[t] - used[u] / weights[u]
            bound = (HORIZON_SECONDS + peak[t] * D_SECONDS) / weights[t] + (
                HORIZON_SECONDS * peak[u] / weights[u]
            )
            assert gap <= bound, f"{t} is ahead of {u} by {gap:.0f} > {bound:.0f} at {clock:.0f}s"
    total = sum(used.values())
    for name, weight in weights.items():  # and the shares of session-seconds converge
        share, fair = used[name] / total, weight / sum(weights.values())
        assert abs(share - fair) <= 0.05, f"{name}: share {share:.3f}, weight share {fair:.3f}"
    assert len(ends) == CAPACITY


def test_a_reservation_takes_the_freed_slot_before_a_larger_guarantee_deficit(
    db: Database,
) -> None:
    """A schedule the random ones rarely reach, driven through the same checks: ``gold``
    (guarantee 2, one slot non-lendable) and ``silver`` (guarantee 4) both wait with nothing
    live in a full pool; the first freed slot is ``gold``'s, though ``silver`` is further
    below its guarantee."""
    machine = TenantAdmissionOnPostgres(db)
    machine.change_policy("gold", 2, None, 1.0, 1)
    machine.change_policy("silver", 4, None, 1.0, 0)
    machine.arrive("bulk", 4, None)
    machine.arrive("default", 3, None)
    machine.caps_maximums_counters_and_the_guarantees_bound()
    machine.arrive_anywhere("silver", 4)
    machine.arrive_anywhere("gold", 2)
    machine.caps_maximums_counters_and_the_guarantees_bound()
    live = snapshot(db)
    assert len(live.live) == CAPACITY and len(live.waiting) == 6
    for _ in range(CAPACITY):
        machine.end_one(0)
        machine.caps_maximums_counters_and_the_guarantees_bound()
    assert snapshot(db).live_of("gold") == 2
    assert snapshot(db).live_of("silver") == 4
    machine.teardown()
