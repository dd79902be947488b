"""The order a freed slot goes in when several tenants wait (``admit`` with
``orchestrator.tenants.choose``, docs/admission.md "The order when a slot frees") on real
Postgres: a tenant below its guarantee comes before older requests of others; over seeded
schedules of arrivals, ends and policy changes, a slot never goes past a tenant below its
guarantee to one at or above its own, no maximum is exceeded, and the counters equal a
recount after every step."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import text

from orchestrator import store
from orchestrator.db import Database
from orchestrator.store.ending import end
from orchestrator.store.rows import S
from orchestrator.store.tenants import set_policy, tenant_drift
from orchestrator.tenants import TenantPolicy
from tests.helpers import live_counts, only_accounts
from tests.test_tenants_counters import CAPS, claim

pytestmark = pytest.mark.postgres


@pytest.fixture
def pool(db: Database) -> Database:
    only_accounts(db, CAPS)
    return db


def end_one_live(db: Database, rng: random.Random) -> str | None:
    """End one live session; the account it freed."""
    with db.transaction() as session:
        found = session.execute(
            text(
                "SELECT id, account FROM sessions WHERE status = 'starting'"
                " ORDER BY random() LIMIT 1 FOR UPDATE"
            )
        ).one_or_none()
        if found is None:
            return None
        end(session, [found.id], S.ENDED, from_statuses=[S.STARTING])
        return str(found.account)


def waiting_by_tenant(db: Database) -> dict[str, int]:
    with db.transaction() as session:
        found = session.execute(
            text("SELECT tenant, count(*) FROM sessions WHERE status = 'waiting' GROUP BY tenant")
        ).all()
    return {str(t): int(n) for t, n in found}


def tenant_of(db: Database, session_id: object) -> str:
    with db.transaction() as session:
        return str(
            session.scalar(text("SELECT tenant FROM sessions WHERE id = :i"), {"i": session_id})
        )


def test_a_tenant_below_its_guarantee_goes_before_older_requests(pool: Database) -> None:
    db = pool
    set_policy(db, TenantPolicy(name="gold", guaranteed=3))
    full = sum(CAPS.values())
    assert all(claim(db, f"b{i}", "bulk").status == "starting" for i in range(full))
    for i in range(4):
        assert claim(db, f"bw{i}", "bulk").status == "waiting"
    gold = [claim(db, f"g{i}", "gold") for i in range(4)]
    order = []
    rng = random.Random(5)
    for _ in range(5):
        freed = end_one_live(db, rng)
        assert freed is not None
        order += [tenant_of(db, i) for i, _ in store.admit(db, account=freed)]
    # gold's three guaranteed slots first, whatever waited longer.
    assert order[:3] == ["gold"] * 3
    assert gold[0].status == "waiting"
    assert tenant_drift(db) == []


POLICIES = [
    TenantPolicy(name="gold", guaranteed=3, maximum=5, weight=2.0),
    TenantPolicy(name="silver", guaranteed=1, maximum=3),
    TenantPolicy(name="capped", maximum=2),
]


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_seeded_schedules_keep_guarantees_first_maximums_and_exact_counters(
    pool: Database, seed: int
) -> None:
    db = pool
    rng = random.Random(seed)
    policies = {p.name: p for p in POLICIES}
    for p in POLICIES:
        set_policy(db, p)
    tenants = [*policies, "default"]
    for step in range(120):
        action = rng.random()
        if action < 0.55:
            tenant = rng.choice(tenants)
            held = live_counts(db, "tenant").get(tenant, 0)
            claimed = claim(db, f"{seed}-{step}", tenant)
            maximum = policies[tenant].maximum if tenant in policies else None
            if claimed.status == "starting" and maximum is not None:
                assert held < maximum, (step, tenant, held)
        elif action < 0.95:
            before_live, before_waiting = live_counts(db, "tenant"), waiting_by_tenant(db)
            freed = end_one_live(db, rng)
            if freed is None:
                continue
            # The live counts the decision saw: the ended session's tenant one fewer.
            before_live = live_counts(db, "tenant")
            admitted = store.admit(db, account=freed)
            below = {
                t
                for t, p in policies.items()
                if before_live.get(t, 0) < p.guaranteed and before_waiting.get(t, 0) > 0
            }
            if admitted and below:
                # admit returns the rows oldest first, not in the order it chose them: the
                # tenants below their guarantee got as many of the slots as they could take.
                given_to = [tenant_of(db, i) for i, _ in admitted]
                deficit = {t: policies[t].guaranteed - before_live.get(t, 0) for t in below}
                got = sum(min(given_to.count(t), d) for t, d in deficit.items())
                could = sum(min(before_waiting[t], d) for t, d in deficit.items())
                assert got >= min(len(given_to), could), (step, given_to, deficit, before_live)
            given: dict[str, int] = {}
            for session_id, _ in admitted:
                t = tenant_of(db, session_id)
                given[t] = given.get(t, 0) + 1
                maximum = policies[t].maximum if t in policies else None
                assert maximum is None or before_live.get(t, 0) + given[t] <= maximum, step
        else:  # a policy change, applied at the next decision
            name = rng.choice(list(policies))
            old = policies[name]
            maximum = rng.choice([old.guaranteed or 1, (old.maximum or 3) + 1, None])
            policies[name] = TenantPolicy(
                name=name, guaranteed=old.guaranteed, maximum=maximum, weight=old.weight
            )
            set_policy(db, policies[name])
        assert tenant_drift(db) == [], step
    assert sum(live_counts(db, "tenant").values()) <= sum(CAPS.values())
