"""Reservations at the claim (migration 0010, docs/admission.md "Tenants"), on real Postgres
without a vendor: a new claim does not take a free slot that other tenants' unfilled
non-lendable reservations need, a tenant with an unfilled reservation of its own takes one at
once (even past older requests the reservation keeps out), and a guarantee without a
reservation is lent."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from orchestrator import store
from orchestrator.db import Database
from orchestrator.store.ending import end
from orchestrator.store.rows import S
from orchestrator.store.tenants import set_policy, tenant_drift
from orchestrator.tenants import TenantPolicy
from tests.helpers import claim_request, live_counts

pytestmark = pytest.mark.postgres

CAPS = {"a": 3, "b": 4}  # seven slots in the pool


@pytest.fixture
def pool(db: Database) -> Database:
    store.sync_catalog(db, [store.CatalogEntry(n, cap, 1.0, {}) for n, cap in CAPS.items()])
    with db.transaction() as session:  # only the two accounts of this test admit
        session.execute(text("UPDATE vendor_accounts SET in_catalog = (name IN ('a', 'b'))"))
    return db


def statuses(db: Database, tenant: str, count: int, prefix: str) -> list[str]:
    return [claim_request(db, f"{prefix}{i}", tenant=tenant).status for i in range(count)]


def test_a_claim_leaves_the_slots_another_tenants_reservation_needs(pool: Database) -> None:
    db = pool
    set_policy(db, TenantPolicy(name="vip", guaranteed=3, reserved=3))
    # Seven slots, three kept for vip: the fifth claim of bulk waits.
    assert statuses(db, "bulk", 5, "bulk-") == ["starting"] * 4 + ["waiting"]
    # The admission its commit asks for (a slot is free) keeps them too, with one tenant
    # waiting as with several.
    assert store.admit(db, account="a") == [] and store.admit(db, account="b") == []
    # vip takes its reserved slots at once, past bulk's older request the reservation keeps
    # out; its fourth request finds the pool full.
    assert statuses(db, "vip", 4, "vip-") == ["starting"] * 3 + ["waiting"]
    assert live_counts(db, "tenant") == {"bulk": 4, "vip": 3}
    assert store.admit(db, account="a") == [] and store.admit(db, account="b") == []
    assert tenant_drift(db) == []


def test_a_reservation_filled_keeps_nothing_and_one_partly_filled_keeps_the_rest(
    pool: Database,
) -> None:
    db = pool
    set_policy(db, TenantPolicy(name="vip", guaranteed=3, reserved=2))
    assert statuses(db, "vip", 1, "vip-") == ["starting"]  # one of two reserved slots used
    # Six free, one kept for vip: bulk gets five.
    assert statuses(db, "bulk", 6, "bulk-") == ["starting"] * 5 + ["waiting"]
    assert statuses(db, "vip", 1, "vip-late-") == ["starting"]  # its own, kept for it
    with db.transaction() as session:  # vip's two end: two free slots, both kept for it
        ids = list(session.scalars(text("SELECT id FROM sessions WHERE tenant = 'vip'")))
        end(session, ids, S.ENDED, from_statuses=[S.STARTING])
    assert statuses(db, "other", 1, "other-") == ["waiting"]
    assert statuses(db, "vip", 1, "vip-again-") == ["starting"]
    assert tenant_drift(db) == []


def test_a_guarantee_without_a_reservation_is_lent(pool: Database) -> None:
    db = pool
    set_policy(db, TenantPolicy(name="lender", guaranteed=5, reserved=0))
    assert statuses(db, "bulk", 8, "bulk-") == ["starting"] * 7 + ["waiting"]


def test_a_reservation_shrinks_with_the_capacity(pool: Database) -> None:
    """Guarantees of 14 on a pool of 7: vip's reservation of 4 counts as 2 (rounded down)."""
    db = pool
    set_policy(db, TenantPolicy(name="vip", guaranteed=8, reserved=4))
    set_policy(db, TenantPolicy(name="gold", guaranteed=6))
    assert statuses(db, "bulk", 6, "bulk-") == ["starting"] * 5 + ["waiting"]
