"""The locks a claim takes (docs/admission.md, "The lock scheme", "One decision"), on real
Postgres without a vendor: a claim that names no account locks only the account it takes
(one row at a time, in rank order), so a decision in progress on one account does not hold
up a claim that another account serves; and claims on many accounts at once never deadlock."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from orchestrator import store
from orchestrator.db import Database
from orchestrator.store.ending import end
from orchestrator.store.rows import S
from tests.helpers import claim_request, live_counts
from tests.threads import in_background, race

pytestmark = pytest.mark.postgres

HELD_SECONDS = 10.0  # how long the test holds an account's row at most


def claim_quickly(db: Database, request_id: str, **wish: object) -> store.Claim:
    """A claim that waits at most half a second for its locks (AdmissionBusy past it)."""
    return claim_request(db, request_id, lock_wait_seconds=0.5, **wish)


@contextmanager
def held_open(db: Database, work: Callable[[Session], object]) -> Iterator[None]:
    """A transaction, in another thread, that does ``work`` and stays open (its locks held)
    while the block runs; it commits when the block ends."""
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with db.transaction() as session:
            work(session)
            holding.set()
            release.wait(HELD_SECONDS)

    holder = in_background(hold)
    try:
        assert holding.wait(HELD_SECONDS)
        yield
    finally:
        release.set()
        holder.result(timeout=HELD_SECONDS)


def ending_one_on_a_held_open(db: Database) -> AbstractContextManager[None]:
    """The oldest session on account ``a`` ended (its counters' triggers lock what they
    update) in a transaction held open while the block runs."""

    def end_one_on_a(session: Session) -> None:
        victim = session.scalar(
            text("SELECT id FROM sessions WHERE account = 'a' ORDER BY created_at LIMIT 1")
        )
        end(session, [victim], S.ENDED, from_statuses=[S.STARTING])

    return held_open(db, end_one_on_a)


def test_a_claim_that_names_no_account_does_not_wait_for_a_decision_on_another(
    db: Database,
) -> None:
    """Account ``a`` is half full, ``b`` empty: a claim that names no account goes to ``b``
    (the most free share). While a transaction that ends a session on ``a`` holds ``a``'s
    row (its counter's trigger), that claim is not held up: it locks ``b`` alone."""
    store.sync_catalog(
        db,
        [
            store.CatalogEntry("a", 10, 1.0, {"region": "eu"}),
            store.CatalogEntry("b", 10, 1.0, {"region": "us"}),
        ],
    )
    for i in range(6):
        assert claim_request(db, f"on-a-{i}", account="a").status == "starting"
    with ending_one_on_a_held_open(db):  # holds a's row (its counter's trigger)
        claimed = claim_quickly(db, "anywhere", tenant="other")
    assert (claimed.status, claimed.account) == ("starting", "b")


def test_claims_of_one_tenant_without_a_maximum_on_different_accounts_do_not_wait(
    db: Database,
) -> None:
    """The same as above within one tenant (``default``, no policy): the end on ``a`` changes
    the tenant's counters on ``a`` only (per tenant and account), so the tenant's claim that
    goes to ``b`` waits for nothing. A counter per tenant (0009 to 0011) was locked by that
    end until its commit, and every start of the tenant queued there."""
    store.sync_catalog(
        db, [store.CatalogEntry("a", 10, 1.0, {}), store.CatalogEntry("b", 10, 1.0, {})]
    )
    with db.transaction() as session:  # only a and b admit in this test
        session.execute(text("UPDATE vendor_accounts SET in_catalog = (name IN ('a', 'b'))"))
    for i in range(6):
        assert claim_request(db, f"on-a-{i}", account="a").status == "starting"
    with ending_one_on_a_held_open(db):  # a's counters, the tenant's on a among them
        started = time.monotonic()
        claimed = claim_quickly(db, "same-tenant")
        named = claim_quickly(db, "same-tenant-on-b", account="b")
        # A wait in the counters' trigger (after the claim's own bounded locks) would last
        # until the holder lets go, HELD_SECONDS.
        took = time.monotonic() - started
    assert (claimed.status, claimed.account) == ("starting", "b")
    assert (named.status, named.account) == ("starting", "b")
    assert took < HELD_SECONDS / 2
    assert live_counts(db, "tenant") == {"default": 7}


def test_a_claim_passes_over_the_first_ranked_account_while_another_decision_holds_it(
    db: Database,
) -> None:
    """``a`` and ``b`` have the same free share, so ``a`` ranks first (by name) for every claim
    that names no account. While a transaction holds ``a``'s row (as a claim deciding on
    ``a`` would), the next such claim does not queue behind it: it takes ``b``."""
    store.sync_catalog(
        db,
        [store.CatalogEntry("a", 10, 1.0, {}), store.CatalogEntry("b", 10, 1.0, {})],
    )
    with db.transaction() as session:  # only a and b admit in this test
        session.execute(text("UPDATE vendor_accounts SET in_catalog = (name IN ('a', 'b'))"))
    hold_a = text("SELECT FROM vendor_accounts WHERE name = 'a' FOR UPDATE")
    with held_open(db, lambda session: session.execute(hold_a)):
        claimed = claim_quickly(db, "second", tenant="other")
    assert (claimed.status, claimed.account) == ("starting", "b")
    assert claim_request(db, "third").account == "a"  # a ranks first again once free


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_unnamed_claims_over_many_accounts_hold_every_cap_without_a_deadlock(
    db: Database, seed: int
) -> None:
    """Rounds of 16 claims at once (most name no account) over five accounts of random caps
    and weights, with ends between rounds: no cap is ever passed, no claim fails (a
    deadlock would raise), the counters equal a recount, and no request waits while an
    account it may use has a free slot once the admissions have run."""
    rng = random.Random(seed)
    caps = {name: rng.randint(1, 4) for name in "vwxyz"}
    store.sync_catalog(
        db,
        [
            store.CatalogEntry(n, cap, rng.choice([0.5, 1.0, 2.0]), {"zone": n})
            for n, cap in caps.items()
        ],
    )
    many = Database(db.engine.url.render_as_string(hide_password=False), pool_size=16)
    try:
        for round_no in range(5):
            wishes = [
                {} if rng.random() < 0.8 else {"account": rng.choice(list(caps))} for _ in range(16)
            ]
            outcomes = race(
                *[
                    (lambda r=f"{seed}-{round_no}-{i}", w=w: claim_request(many, r, **w).status)
                    for i, w in enumerate(wishes)
                ]
            )
            assert set(outcomes) <= {"starting", "waiting"}
            live = live_counts(db, "account")
            assert all(live.get(n, 0) <= cap for n, cap in caps.items()), (round_no, live)
            assert store.drift(db) == []
            with db.transaction() as session:  # about half of what is live ends
                ids = list(
                    session.scalars(text("SELECT id FROM sessions WHERE status = 'starting'"))
                )
                end(session, rng.sample(ids, len(ids) // 2), S.ENDED, from_statuses=[S.STARTING])
            for name in caps:
                store.admit(db, account=name)
            with db.transaction() as session:
                stranded = session.execute(
                    text(
                        "SELECT w.request_id FROM sessions w JOIN vendor_accounts a"
                        " ON a.in_use < a.effective_cap AND a.name = ANY(:names)"
                        " AND (w.account = a.name OR w.account IS NULL)"
                        " WHERE w.status = 'waiting'"
                    ),
                    {"names": list(caps)},
                ).all()
            assert stranded == [], round_no
    finally:
        many.dispose()


class AdmitEveryAccount:
    """The commit hooks of a database: a freed slot runs an admission pass over the open
    accounts at once, as the lifecycle's dispatcher does (inline here, no broker)."""

    def __init__(self) -> None:
        self.admitted: list[str] = []

    def slot_freed(self, db: Database) -> None:
        for name in store.open_accounts(db):
            self.admitted += [str(i) for i, _ in store.admit(db, account=name)]

    def events_pending(self, db: Database) -> None:
        pass


def test_a_slot_freed_while_a_claim_decides_to_wait_is_not_lost(db: Database) -> None:
    """The claim finds ``a`` full and, before its waiting row commits, the session on ``a``
    ends and its admission runs (finding nothing to admit): held here by the test keeping
    the tenant's policy row (it has a maximum), which a waiting claim locks last. After the
    claim's commit its look at the eligible accounts' counters sees the free slot and admits
    the request."""
    store.sync_catalog(db, [store.CatalogEntry("a", 1, 1.0, {})])
    with db.transaction() as session:  # only account a admits in this test
        session.execute(text("UPDATE vendor_accounts SET in_catalog = (name = 'a')"))
    assert claim_request(db, "first", account="a").status == "starting"
    hooks = AdmitEveryAccount()
    hooked = Database(db.engine.url.render_as_string(hide_password=False), hooks=hooks)
    with db.transaction() as session:  # a maximum: a waiting claim locks its policy row
        session.execute(text("INSERT INTO tenants (name, maximum) VALUES ('late', 5)"))
    hold_the_tenant = text("SELECT FROM tenants WHERE name = 'late' FOR UPDATE")
    try:
        with held_open(db, lambda session: session.execute(hold_the_tenant)):
            claimed = in_background(lambda: claim_request(hooked, "late", tenant="late"))
            deadline = time.monotonic() + HELD_SECONDS
            while not waiting_for_a_lock(db) and time.monotonic() < deadline:  # it waits
                time.sleep(0.02)
            with db.transaction() as session:  # the first session ends: a is free
                first = session.scalar(text("SELECT id FROM sessions WHERE request_id = 'first'"))
                end(session, [first], S.ENDED, from_statuses=[S.STARTING])
            assert store.admit(db, account="a") == []  # its admission: nothing waits yet
        result = claimed.result(timeout=HELD_SECONDS)
    finally:
        hooked.dispose()
    assert result.status == "waiting"
    assert hooks.admitted == [str(result.session_id)]
    assert live_counts(db, "account") == {"a": 1}


def waiting_for_a_lock(db: Database) -> bool:
    """Whether a backend of this test's database waits for a lock."""
    with db.transaction() as session:
        return bool(
            session.scalar(
                text(
                    "SELECT EXISTS (SELECT FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock')"
                )
            )
        )
