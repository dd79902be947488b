"""The per-account counters and the claim on real Postgres, without a vendor: concurrent
claims over three accounts never exceed any cap, the counters equal a recount after any mix
of claims, admissions and ends, the migration recounts what was there, and a claim's cost
does not grow with the number of live sessions."""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid

import pytest
from sqlalchemy import text

from orchestrator import store
from orchestrator.db import Database
from orchestrator.db.migrate import upgrade
from orchestrator.store.ending import end
from orchestrator.store.rows import S
from tests.conftest import fresh_postgres_database
from tests.helpers import claim_request as claim
from tests.helpers import end_one_at_random, insert_rows_of_an_older_schema, live_counts

pytestmark = pytest.mark.postgres

CAPS = {"a": 2, "b": 3, "c": 5}
LABELS = {"a": {"region": "eu"}, "b": {"region": "eu"}, "c": {"region": "us"}}
SEEDS = [1, 2, 3]


@pytest.fixture
def accounts(db: Database) -> Database:
    store.sync_catalog(db, [store.CatalogEntry(n, cap, 1.0, LABELS[n]) for n, cap in CAPS.items()])
    return db


@pytest.mark.parametrize("seed", SEEDS)
def test_concurrent_claims_and_ends_over_three_accounts_never_exceed_a_cap(
    accounts: Database, seed: int
) -> None:
    """Eight threads claim (named, by label or anywhere), end and admit at random while a
    watcher reads the live rows per account; afterwards the counters equal a recount."""
    db = accounts
    wishes: list[dict[str, object]] = [
        {},
        {},
        {"account": "a"},
        {"account": "c"},
        {"labels": {"region": "eu"}},
        {"labels": {"region": "us"}},
    ]
    over: list[dict[str, int]] = []
    done = threading.Event()

    peak = dict.fromkeys(CAPS, 0)

    def watch() -> None:
        while not done.is_set():
            live = live_counts(db, "account")
            if any(live.get(n, 0) > cap for n, cap in CAPS.items()):
                over.append(live)
            for name in CAPS:
                peak[name] = max(peak[name], live.get(name, 0))

    def worker(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        for step in range(40):
            action = rng.random()
            if action < 0.6:
                claim(db, f"{seed}-{index}-{step}", **rng.choice(wishes))
            elif action < 0.85:
                end_one_at_random(db, rng)
            else:
                store.admit(db, account=rng.choice(list(CAPS)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive()
    finally:
        done.set()
        watcher.join(timeout=10)
    assert over == []
    assert peak == CAPS  # every account was filled to its cap at some point, never past it
    assert store.drift(db) == []
    states = {s.name: s for s in store.account_states(db)}
    for name, cap in CAPS.items():
        assert states[name].in_use == live_counts(db, "account").get(name, 0) <= cap
    # Nothing waits that an account with a free slot could take (no lost wake-up), once
    # every account has run its admission.
    for name in CAPS:
        store.admit(db, account=name)
    with db.transaction() as session:
        stranded = session.execute(
            text(
                "SELECT w.request_id, a.name FROM sessions w JOIN vendor_accounts a"
                " ON a.name IN ('a', 'b', 'c') AND a.in_use < a.effective_cap"
                " AND (w.account = a.name OR (w.account IS NULL AND"
                " (w.requested_labels IS NULL OR a.labels @> w.requested_labels)))"
                " WHERE w.status = 'waiting'"
            )
        ).all()
    assert stranded == []


def test_the_counters_follow_every_kind_of_change_and_a_truncate(accounts: Database) -> None:
    db = accounts
    assert claim(db, "one", account="a").status == "starting"
    assert claim(db, "two", account="a").status == "starting"
    assert claim(db, "three", account="a").status == "waiting"
    states = {s.name: s for s in store.account_states(db)}
    assert (states["a"].in_use, states["a"].waiting) == (2, 1)
    with db.transaction() as session:  # an account moved by hand: both counters follow
        session.execute(text("UPDATE sessions SET account = 'b' WHERE request_id = 'two'"))
        session.execute(text("DELETE FROM sessions WHERE request_id = 'three'"))
    states = {s.name: s for s in store.account_states(db)}
    assert (states["a"].in_use, states["a"].waiting, states["b"].in_use) == (1, 0, 1)
    assert store.drift(db) == []
    with db.transaction() as session:
        session.execute(text("TRUNCATE sessions CASCADE"))
    assert all(s.in_use == 0 and s.waiting == 0 for s in store.account_states(db))


def test_the_migration_counts_the_rows_that_were_there() -> None:
    with fresh_postgres_database("orch_accounts_recount") as url:
        upgrade(url, "0006")
        database = Database(url, pool_size=1)
        try:
            insert_rows_of_an_older_schema(
                database, ["active", "stopping", "waiting", "ended", "starting"]
            )
            upgrade(url)
            (default,) = [s for s in store.account_states(database) if s.name == "default"]
            assert (default.in_use, default.waiting) == (3, 1)
            assert store.drift(database) == []
        finally:
            database.dispose()


def claim_latency(db: Database, count: int) -> float:
    """Median seconds of ``count`` claims (each admitted and then ended again)."""
    took = []
    for _ in range(count):
        request_id = uuid.uuid4().hex
        began = time.perf_counter()
        claimed = claim(db, request_id, account="big")
        took.append(time.perf_counter() - began)
        assert claimed.status == "starting"
        with db.transaction() as session:
            end(session, [claimed.session_id], S.FAILED, from_statuses=[S.STARTING])
    return statistics.median(took)


def add_live_rows(db: Database, count: int) -> None:
    with db.transaction() as session:
        session.execute(
            text(
                "INSERT INTO sessions (id, request_id, status, request_payload, payload_sha256,"
                " created_at, attempts, stop_attempts, account)"
                " SELECT gen_random_uuid(), 'live-' || g || '-' || :tag, 'active', '{}', 'x',"
                " now(), 1, 0, 'big' FROM generate_series(1, :n) AS g"
            ),
            {"n": count, "tag": uuid.uuid4().hex[:6]},
        )


def test_a_claims_cost_does_not_grow_with_the_live_sessions(db: Database) -> None:
    store.sync_catalog(db, [store.CatalogEntry("big", 10_000, 1.0, {})])
    add_live_rows(db, 100)
    claim_latency(db, 10)  # warm the plans and the pool
    at_100 = claim_latency(db, 40)
    add_live_rows(db, 4_900)
    at_5000 = claim_latency(db, 40)
    print(f"\nclaim median: {at_100 * 1000:.2f} ms at 100 live, {at_5000 * 1000:.2f} ms at 5,000")
    # Generous (a shared machine): counting 5,000 live rows under the lock cost ~5 ms alone.
    assert at_5000 < at_100 * 2 + 0.002


OLD_CLAIM = text(
    "SELECT status FROM orchestrator_claim(CAST(:id AS uuid), CAST(:r AS text), CAST(:r AS text),"
    " CAST('x' AS text), CAST('{}' AS jsonb), CAST('d' AS text), CAST(NULL AS jsonb),"
    " CAST(NULL AS integer), CAST(NULL AS integer), CAST(NULL AS text), CAST(:cap AS integer),"
    " CAST('old' AS text), CAST(60 AS double precision), CAST(5000 AS integer))"
)


def test_the_previous_releases_claim_and_this_ones_share_the_cap_of_default(
    db: Database, database_url: str
) -> None:
    """Mixed fleet (migration 0007): a worker of the release at 0006 claims with its own
    function (one global lock, a count of live rows); this release's claims on ``default``
    take that lock too, so together they never pass the cap. Rounds of 24 claims at once,
    half of each release."""
    from tests.threads import race

    cap = 3
    store.sync_catalog(db, [store.CatalogEntry("default", cap, 1.0, {})])
    many = Database(database_url, pool_size=24)

    def old(request_id: str) -> str:
        with many.autocommit() as connection:
            status: str = connection.execute(
                OLD_CLAIM, {"id": uuid.uuid4(), "r": request_id, "cap": cap}
            ).scalar_one()
        return status

    try:
        for round_no in range(6):
            outcomes = race(
                *[
                    (lambda r=f"old-{round_no}-{i}": old(r))
                    if i % 2
                    else (lambda r=f"new-{round_no}-{i}": claim(many, r).status)
                    for i in range(24)
                ]
            )
            assert outcomes.count("starting") <= cap, round_no
            assert live_counts(db, "account").get("default", 0) <= cap, round_no
            assert store.drift(db) == []
            with db.transaction() as session:  # everything ends: the next round starts empty
                ids = list(session.scalars(text("SELECT id FROM sessions WHERE status <> 'ended'")))
                end(session, ids, S.ENDED, from_statuses=[S.STARTING, S.WAITING])
    finally:
        many.dispose()


ELIGIBLE_OLDER = text(
    "SELECT w.request_id FROM sessions w JOIN vendor_accounts a ON a.name = :account"
    " WHERE w.status = 'waiting' AND w.created_at < :created"
    " AND (w.account = a.name OR (w.account IS NULL"
    " AND (w.requested_labels IS NULL OR a.labels @> w.requested_labels)))"
)
STRANDED = text(
    "SELECT w.request_id, a.name FROM sessions w JOIN vendor_accounts a"
    " ON a.in_catalog AND a.enabled AND NOT a.draining AND a.in_use < a.effective_cap"
    " AND (w.account = a.name OR (w.account IS NULL AND"
    " (w.requested_labels IS NULL OR a.labels @> w.requested_labels)))"
    " WHERE w.status = 'waiting'"
)


def live_rows(db: Database) -> dict[str, tuple[str, object]]:
    with db.transaction() as session:
        found = session.execute(
            text(
                "SELECT request_id, account, created_at FROM sessions"
                " WHERE status IN ('starting', 'active', 'stopping')"
            )
        ).all()
    return {r: (a, c) for r, a, c in found}


@pytest.mark.parametrize("seed", SEEDS)
def test_each_account_serves_the_oldest_request_it_may_and_no_slot_idles_while_one_waits(
    accounts: Database, seed: int
) -> None:
    """A seeded schedule of claims (named, by label, anywhere) and ends, each end followed by
    the admission its commit asks for. After every step: a request that went live on an
    account left no older request waiting that the account could have served (first in
    first out per eligible set), and no request waits while an account it may use is free."""
    db = accounts
    rng = random.Random(seed)
    wishes: list[dict[str, object]] = [
        {},
        {"account": "a"},
        {"account": "b"},
        {"labels": {"region": "eu"}},
        {"labels": {"region": "us"}},
    ]
    went_live = 0
    pending = False  # a slot freed whose after-commit admission has not run yet
    for step in range(120):
        before = live_rows(db)
        action = rng.random()
        if action < 0.55 or not before:
            claim(db, f"{seed}-{step}", **rng.choice(wishes))
        elif action < 0.85:
            with db.transaction() as session:
                victim = session.execute(
                    text("SELECT id FROM sessions WHERE request_id = :r"),
                    {"r": rng.choice(sorted(before))},
                ).scalar_one()
                end(session, [victim], S.ENDED, from_statuses=[S.STARTING])
            pending = True  # claims may come before the admission this end asks for
        if pending and (action >= 0.85 or rng.random() < 0.3):
            for name in CAPS:  # the end's after-commit admission
                store.admit(db, account=name)
            pending = False
        after = live_rows(db)
        with db.transaction() as session:
            for request_id in set(after) - set(before):
                went_live += 1
                account, created = after[request_id]
                overtaken = session.execute(
                    ELIGIBLE_OLDER, {"account": account, "created": created}
                ).all()
                assert overtaken == [], (step, request_id, account, overtaken)
            if not pending:
                assert session.execute(STRANDED).all() == [], step
    assert went_live > 20  # the schedule admitted many, from claims and from the waiting
    assert store.drift(db) == []
