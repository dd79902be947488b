"""Tenants on real Postgres, without a vendor (migration 0009): the per-tenant counters equal
a recount after any mix of claims, admissions and ends over two accounts; a tenant's maximum
holds across accounts under concurrent claims; the waiting cap refuses with a ``failed`` row
naming the reason; a tenant at its maximum holds no other tenant back."""

from __future__ import annotations

import random
import threading

import pytest
from sqlalchemy import text

from orchestrator import store
from orchestrator.db import Database, SessionRow
from orchestrator.db.migrate import upgrade
from orchestrator.store.ending import end
from orchestrator.store.rows import S
from orchestrator.store.tenants import policies, set_policy, tenant_drift, usage
from orchestrator.tenants import TenantPolicy
from tests.conftest import fresh_postgres_database
from tests.helpers import (
    claim_request,
    end_one_at_random,
    insert_rows_of_an_older_schema,
    live_counts,
    only_accounts,
)

pytestmark = pytest.mark.postgres

CAPS = {"a": 3, "b": 4}
MAXIMUMS = {"small": 2, "mid": 3}
SEEDS = [1, 2, 3]
OTHERS_NAME = ("mid", "default")  # tenants whose requests in the stress test may name an account


@pytest.fixture
def pool(db: Database) -> Database:
    only_accounts(db, CAPS)
    for name, maximum in MAXIMUMS.items():
        set_policy(db, TenantPolicy(name=name, maximum=maximum))
    return db


def claim(db: Database, request_id: str, tenant: str, **wish: object) -> store.Claim:
    return claim_request(db, request_id, tenant=tenant, **wish)


# The stress test's other policies: a guarantee with a non-lendable part under a maximum, and a
# guarantee alone; changed (guarantees, reservations, weights; never a maximum) while it runs.
STRESS_POLICIES = [
    TenantPolicy(name="gold", guaranteed=2, maximum=4, weight=2.0, reserved=1),
    TenantPolicy(name="silver", guaranteed=1, weight=0.5),
]
STRESS_MAXIMUMS = {**MAXIMUMS, "gold": 4}


@pytest.mark.parametrize("seed", SEEDS)
def test_concurrent_claims_never_exceed_a_tenants_maximum_and_the_counters_stay_exact(
    pool: Database, seed: int
) -> None:
    """Sixteen threads claim for five tenants (three with maximums, two with guarantees, one
    of them partly non-lendable; some requests naming an account), end, admit and change the
    guarantees at random over two accounts while a watcher reads the live rows per tenant
    and per account."""
    db = pool
    for policy in STRESS_POLICIES:
        set_policy(db, policy)
    for name, maximum in MAXIMUMS.items():  # fair sharing would favour them: maximums decide
        set_policy(db, TenantPolicy(name=name, maximum=maximum, weight=5.0))
    tenants = ["small", "mid", "gold", "silver", "default"]
    pressed = ["small", "small", "mid", "mid", "mid", *tenants[2:]]  # on the maximums
    over: list[dict[str, int]] = []
    peak = dict.fromkeys(MAXIMUMS, 0)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            live = live_counts(db, "tenant")
            if any(live.get(t, 0) > m for t, m in STRESS_MAXIMUMS.items()):
                over.append(live)
            for name in MAXIMUMS:
                peak[name] = max(peak[name], live.get(name, 0))
            by_account = live_counts(db, "account")
            if any(by_account.get(a, 0) > cap for a, cap in CAPS.items()):
                over.append(by_account)

    def worker(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        for step in range(40):
            action = rng.random()
            if action < 0.6:
                tenant = rng.choice(pressed)
                wish = {"account": rng.choice(list(CAPS))} if tenant in OTHERS_NAME else {}
                claim(db, f"{seed}-{index}-{step}", tenant, **wish)
            elif action < 0.85:
                end_one_at_random(db, rng)
                for account in CAPS:  # the slot-freed wake-up, as the service sends it
                    store.admit(db, account=account)
            elif action < 0.97:
                store.admit(db, account=rng.choice(list(CAPS)))
            else:
                old = rng.choice(STRESS_POLICIES)
                guaranteed = rng.randint(0, 2)
                set_policy(
                    db,
                    TenantPolicy(
                        name=old.name,
                        guaranteed=guaranteed,
                        maximum=old.maximum,
                        weight=rng.choice([0.5, 1.0, 3.0]),
                        reserved=rng.randint(0, guaranteed),
                    ),
                )

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
            assert not t.is_alive()
    finally:
        done.set()
        watcher.join(timeout=10)
    assert over == []
    assert all(peak[n] <= m for n, m in MAXIMUMS.items()), peak
    assert tenant_drift(db) == []
    assert store.drift(db) == []
    counted = {u.name: u.in_use for u in usage(db)}
    assert {t: counted.get(t, 0) for t in tenants} == {
        t: live_counts(db, "tenant").get(t, 0) for t in tenants
    }


def test_a_tenant_at_its_maximum_holds_no_other_tenant_back(pool: Database) -> None:
    db = pool
    for i in range(2):
        assert claim(db, f"s{i}", "small").status == "starting"
    held = claim(db, "s-held", "small")
    assert held.status == "waiting"  # at its maximum, slots free
    later = claim(db, "d-later", "default")
    assert later.status == "starting"  # not behind small's request, which may not go
    assert store.admit(db, account="a") == []  # a slot is free, but not for small
    with db.transaction() as session:
        first = session.scalars(text("SELECT id FROM sessions WHERE request_id = 's0'")).one()
        end(session, [first], S.ENDED, from_statuses=[S.STARTING])
    admitted = store.admit(db, account="a") + store.admit(db, account="b")
    assert [session_id for session_id, _ in admitted] == [held.session_id]
    assert live_counts(db, "tenant")["small"] == 2
    assert tenant_drift(db) == []


def test_the_waiting_cap_refuses_with_a_failed_row_naming_the_reason(pool: Database) -> None:
    db = pool
    set_policy(db, TenantPolicy(name="capped", maximum=1, waiting_cap=1))
    assert claim(db, "c0", "capped").status == "starting"
    assert claim(db, "c1", "capped").status == "waiting"
    refused = claim(db, "c2", "capped")
    assert (refused.outcome, refused.status) == (store.ClaimOutcome.REFUSED, "failed")
    with db.transaction() as session:
        row = session.get_one(SessionRow, refused.session_id)
        assert (row.tenant, row.error_code) == ("capped", store.TENANT_WAITING_CAP)
        assert "capped" in (row.error_message or "")
        assert "max_waiting" in (row.error_message or "")
    again = claim(db, "c2", "capped")  # a redelivery finds its row
    assert (again.outcome, again.session_id) == (store.ClaimOutcome.RESUME, refused.session_id)
    assert tenant_drift(db) == []
    (capped,) = [u for u in usage(db) if u.name == "capped"]
    assert (capped.in_use, capped.waiting) == (1, 1)


def test_a_policy_set_applies_at_the_next_claim(pool: Database) -> None:
    db = pool
    assert claim(db, "m0", "grow").status == "starting"
    set_policy(db, TenantPolicy(name="grow", maximum=1))
    assert claim(db, "m1", "grow").status == "waiting"
    set_policy(db, TenantPolicy(name="grow", maximum=2, weight=3.0))
    assert policies(db)["grow"] == TenantPolicy(name="grow", maximum=2, weight=3.0)
    assert [i for i, _ in store.admit(db, account="b")] == [claim(db, "m1", "grow").session_id]


def test_ended_sessions_charge_their_tenant_seconds(pool: Database) -> None:
    db = pool
    claimed = claim(db, "u0", "mid")
    with db.transaction() as session:
        session.execute(
            text("UPDATE sessions SET admitted_at = now() - interval '100 seconds' WHERE id = :i"),
            {"i": claimed.session_id},
        )
        end(session, [claimed.session_id], S.ENDED, from_statuses=[S.STARTING])
    (mid,) = [u for u in usage(db) if u.name == "mid"]
    assert 99 <= mid.used_seconds <= 110
    assert mid.in_use == 0


def test_the_migration_gives_existing_rows_the_default_tenant_and_counts_them() -> None:
    with fresh_postgres_database("orch_tenants_recount") as url:
        upgrade(url, "0007")
        database = Database(url, pool_size=1)
        try:
            insert_rows_of_an_older_schema(
                database, ["active", "stopping", "waiting", "ended", "starting"]
            )
            upgrade(url)
            (default,) = usage(database)
            assert (default.name, default.in_use, default.waiting) == ("default", 3, 1)
            assert tenant_drift(database) == []
        finally:
            database.dispose()


def test_one_admission_stops_a_tenant_at_its_maximum_and_fills_the_rest(pool: Database) -> None:
    db = pool
    full = [claim(db, f"d{i}", "default") for i in range(sum(CAPS.values()))]
    assert all(c.status == "starting" for c in full)
    small = [claim(db, f"s{i}", "small") for i in range(3)]
    young = claim(db, "d-young", "default")
    assert all(c.status == "waiting" for c in [*small, young])
    on_b = [c.session_id for c in full if c.account == "b"][:3]
    with db.transaction() as session:
        end(session, on_b, S.ENDED, from_statuses=[S.STARTING])
    admitted = [session_id for session_id, _ in store.admit(db, account="b")]
    # Three free slots: small's two oldest (its maximum), then the next tenant's request.
    assert admitted == [small[0].session_id, small[1].session_id, young.session_id]
    assert live_counts(db, "tenant")["small"] == 2
    assert tenant_drift(db) == []
