"""Admission over a pool of vendor accounts (docs/admission.md), on real Postgres and the
simulator serving three accounts with caps 2, 3 and 5: routing, waiting and admission per
account, each later vendor call with the row's own key, drains, exact counters."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from orchestrator import store
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.lifecycle import Lifecycle, handle_start_message, reconcile, request_stop
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.simulator import SimulatorAccount, SimulatorConfig, SimulatorServer
from tests.helpers import row
from tests.threads import race

pytestmark = pytest.mark.postgres

CAPS = {"a": 2, "b": 3, "c": 5}
LABELS = {"a": {"region": "eu"}, "b": {"region": "eu"}, "c": {"region": "us"}}


def keys(name: str) -> tuple[str, str]:
    return f"app-{name}", f"key-{name}"


@pytest.fixture(scope="module")
def pool_sim() -> Iterator[SimulatorServer]:
    accounts = [SimulatorAccount(n, *keys(n), max_concurrent_sessions=c) for n, c in CAPS.items()]
    with SimulatorServer(SimulatorConfig(accounts=accounts, seed=1)) as server:
        yield server


@pytest.fixture
def sim(pool_sim: SimulatorServer) -> SimulatorServer:
    pool_sim.reset(restore_config=True)  # every account's knobs as configured above
    return pool_sim


def write_accounts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, cap in CAPS.items():
        app_id, user_key = keys(name)
        definition = {"app_id": app_id, "user_key": user_key, "cap": cap, "labels": LABELS[name]}
        (folder / f"{name}.json").write_text(json.dumps(definition))
    return folder


@pytest.fixture
def pool(
    settings_for: Callable[..., Settings], db: Database, sim: SimulatorServer, tmp_path: Path
) -> Iterator[Lifecycle]:
    """A worker's lifecycle holding the three accounts (and no ``default``)."""
    settings = settings_for(
        deepbrain_base_url=sim.base_url,
        deepbrain_app_id=None,
        deepbrain_user_key=None,
        accounts_dir=write_accounts(tmp_path / "accounts"),
    )
    lc = inline_lifecycle(settings)
    yield lc
    lc.close()


def start(lc: Lifecycle, request_id: str, **kwargs: object) -> str:
    body = {"avatar_id": "x", "request_id": request_id, **kwargs}
    return handle_start_message(lc, (), body, claim_id=f"t-{request_id}").status


def vendor_statuses(sim: SimulatorServer, name: str) -> dict[str, int]:
    found: dict[str, int] = sim.stats()["accounts"][name]["statuses"].get("start", {})
    return found


def test_ten_starts_fill_three_accounts_with_no_vendor_rejection_and_the_eleventh_waits(
    pool: Lifecycle, sim: SimulatorServer
) -> None:
    outcomes = race(*[lambda i=i: start(pool, f"r-{i}") for i in range(10)])
    assert outcomes == ["active"] * 10
    by_account = {n: sorted(r.request_id for r in rows_of(pool.db, n)) for n in CAPS}
    assert {n: len(ids) for n, ids in by_account.items()} == CAPS
    for name, cap in CAPS.items():
        assert vendor_statuses(sim, name) == {"200": cap}  # never a 403/4030
        assert len(sim.sessions("active", account=name)) == cap
    assert start(pool, "eleventh") == "waiting"
    assert row(pool.db, "eleventh").account is None  # bound to no account while it waits

    freed = by_account["b"][0]
    request_stop(pool, request_id=freed)  # a slot frees on b: the eleventh starts there
    late = row(pool.db, "eleventh")
    assert (late.status, late.account) == ("active", "b")
    assert [s["status"] for s in sim.sessions(account="b")].count("active") == 3
    assert store.drift(pool.db) == []


def rows_of(db: Database, account: str) -> list[object]:
    with db.transaction() as session:
        return list(
            session.execute(
                text("SELECT request_id FROM sessions WHERE account = :a AND status = 'active'"),
                {"a": account},
            ).all()
        )


def test_routing_goes_to_the_most_weighted_free_share_and_honours_names_and_labels(
    pool: Lifecycle,
) -> None:
    # Every share is 1.0: ties go by name. Then a holds 1/2, b and c all theirs: b next.
    assert [start(pool, f"s-{i}") for i in range(2)] == ["active", "active"]
    assert [row(pool.db, f"s-{i}").account for i in range(2)] == ["a", "b"]
    assert start(pool, "named", account="c") == "active"
    assert row(pool.db, "named").account == "c"
    assert start(pool, "us", account_labels={"region": "us"}) == "active"
    assert row(pool.db, "us").account == "c"


def test_an_unknown_account_or_label_is_a_failed_row_naming_it(pool: Lifecycle) -> None:
    assert start(pool, "nobody", account="z") == "failed"
    failed = row(pool.db, "nobody")
    assert failed.error_code == "VALIDATION_ERROR"
    assert "no account named 'z'" in (failed.error_message or "")
    assert start(pool, "mars", account_labels={"region": "mars"}) == "failed"
    assert "region=mars" in (row(pool.db, "mars").error_message or "")


def test_a_request_never_waits_behind_one_it_could_not_have_been_served_before(
    pool: Lifecycle,
) -> None:
    for i in range(10):  # every slot taken
        assert start(pool, f"full-{i}") == "active"
    assert start(pool, "wants-a", account="a") == "waiting"
    assert start(pool, "wants-us", account_labels={"region": "us"}) == "waiting"
    assert start(pool, "anyone") == "waiting"
    on_c = sorted(r[0] for r in rows_of(pool.db, "c"))  # type: ignore[index]
    request_stop(pool, request_id=on_c[0])
    # c frees a slot: the oldest request c may serve is wants-us (wants-a is not c's).
    assert row(pool.db, "wants-us").status == "active"
    assert row(pool.db, "wants-a").status == "waiting"
    assert row(pool.db, "anyone").status == "waiting"
    on_a = sorted(r[0] for r in rows_of(pool.db, "a"))  # type: ignore[index]
    request_stop(pool, request_id=on_a[0])
    assert row(pool.db, "wants-a").status == "active"
    assert row(pool.db, "anyone").status == "waiting"


def test_a_session_live_at_the_vendor_with_no_row_is_stopped_with_its_own_accounts_key(
    pool: Lifecycle, sim: SimulatorServer
) -> None:
    assert start(pool, "ours") == "active"  # on a: not an orphan
    app_id, user_key = keys("b")
    with httpx.Client(base_url=sim.base_url, timeout=5) as client:
        token = client.post(
            "/api/v2/sessions/token", json={"appId": app_id, "userKey": user_key}
        ).json()["data"]["session_token"]
        orphan = client.post(
            "/api/v2/sessions/start",
            json={"avatar_id": "x"},
            headers={"Authorization": f"Bearer {token}"},
        ).json()["data"]["session_id"]
    report = reconcile(pool)
    assert report.orphans_stopped == 1
    (stopped,) = sim.sessions(account="b")
    assert (stopped["session_id"], stopped["status"]) == (orphan, "ended")
    assert stopped["end_reason"] == "ZOMBIE_SESSION_REAP"
    assert row(pool.db, "ours").status == "active"
    assert [s["status"] for s in sim.sessions(account="a")] == ["active"]
    for name in CAPS:  # every account was listed with its own key, none refused
        assert sim.stats()["accounts"][name]["statuses"]["list"] == {"200": 1}


def test_a_drained_account_takes_no_start_and_its_sessions_still_end(
    pool: Lifecycle, sim: SimulatorServer
) -> None:
    assert start(pool, "on-a-0", account="a") == "active"  # a keeps a free slot
    assert store.switch(pool.db, "a", store.Switch.DRAIN)
    assert [start(pool, f"later-{i}") for i in range(8)] == ["active"] * 8
    assert {row(pool.db, f"later-{i}").account for i in range(8)} == {"b", "c"}
    assert start(pool, "waits") == "waiting"  # a has a free slot, but drains
    assert start(pool, "named-a", account="a") == "waiting"
    request_stop(pool, request_id="on-a-0")  # ends with a's key; a admits nobody
    assert row(pool.db, "on-a-0").status == "ended"
    ended = [s for s in sim.sessions(account="a") if s["status"] == "ended"]
    assert len(ended) == 1 and ended[0]["end_reason"] == "USER_CLOSED"
    assert (row(pool.db, "waits").status, row(pool.db, "named-a").status) == (
        "waiting",
        "waiting",
    )
    states = {s.name: s for s in store.account_states(pool.db)}
    assert (states["a"].health, states["a"].in_use) == ("draining", 0)
    assert store.switch(pool.db, "a", store.Switch.ENABLE)
    from orchestrator.lifecycle import admit_waiting

    admit_waiting(pool)  # the beat's backstop pass: a admits the oldest it may serve
    assert row(pool.db, "waits").status == "active"
    assert row(pool.db, "waits").account == "a"


def test_the_accounts_command_shows_and_steers_the_accounts_and_never_a_key(
    pool: Lifecycle,
) -> None:
    from click.testing import CliRunner

    from orchestrator.cli import main
    from tests.conftest import settings_env

    env = settings_env(pool.settings)

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, ["accounts", *args], env=env)
        return result.exit_code, result.output

    assert start(pool, "one", account="b") == "active"
    code, out = run("--json")
    assert code == 0, out
    shown = {a["name"]: a for a in json.loads(out)}
    assert (shown["b"]["in_use"], shown["b"]["effective_cap"], shown["b"]["health"]) == (1, 3, "ok")
    assert shown["c"]["labels"] == {"region": "us"}
    code, out = run()
    assert code == 0 and "in use" in out and "region=eu" in out
    assert run("drain", "b") == (0, "account b: drained\n")
    assert {a["name"]: a["health"] for a in json.loads(run("--json")[1])}["b"] == "draining"
    assert run("enable", "b")[0] == 0
    assert run("disable", "nope")[0] == 1
    assert run("verify") == (0, "counters match the rows\n")
    everything = run("--json")[1] + run()[1]
    assert not any(secret in everything for name in CAPS for secret in keys(name))


def test_an_account_answering_5xx_is_cut_off_after_three_calls_and_back_after_a_good_list(
    pool: Lifecycle, sim: SimulatorServer
) -> None:
    from orchestrator.lifecycle import admit_waiting

    sim.configure_account("a", server_errors=True)
    outcomes = [start(pool, f"bad-{i}", account="a") for i in range(3)]
    assert outcomes == ["waiting"] * 3  # they name a: they wait for it (the first failed once)
    admit_waiting(pool)  # a is tried again for the two oldest: three failed calls in all
    states = {s.name: s for s in store.account_states(pool.db)}
    assert states["a"].health == "circuit-open"
    assert states["a"].consecutive_failures == 3 and states["a"].last_error
    # a would win the tie by name: with its circuit open, starts go to the others.
    assert [start(pool, f"good-{i}") for i in range(3)] == ["active"] * 3
    assert {row(pool.db, f"good-{i}").account for i in range(3)} <= {"b", "c"}
    assert start(pool, "named-a", account="a") == "waiting"  # waits for a alone
    sim.configure_account("a", server_errors=False)
    reconcile(pool)  # a's list, the cheap call, succeeds: the circuit closes
    assert {s.name: s.health for s in store.account_states(pool.db)}["a"] == "ok"
    admit_waiting(pool)  # a's two slots go to the oldest requests waiting for it
    named = ["bad-0", "bad-1", "bad-2", "named-a"]
    assert [(row(pool.db, r).status, row(pool.db, r).account) for r in named] == [
        ("active", "a"),
        ("active", "a"),
        ("waiting", "a"),
        ("waiting", "a"),
    ]


def test_a_refused_key_disables_its_account_and_nothing_else(
    pool: Lifecycle, sim: SimulatorServer
) -> None:
    sim.configure_account("b", refuse_key=True)
    assert start(pool, "refused", account="b") == "failed"
    states = {s.name: s for s in store.account_states(pool.db)}
    assert (states["b"].enabled, states["b"].health) == (False, "disabled")
    assert states["b"].disabled_reason == "the vendor refused its key"
    assert [s.health for n, s in states.items() if n in ("a", "c")] == ["ok", "ok"]
    with pool.db.transaction() as session:
        kinds = (
            session.execute(
                text(
                    "SELECT detail->>'account' FROM session_events WHERE kind = 'account.disabled'"
                )
            )
            .scalars()
            .all()
        )
    assert kinds == ["b"]
    assert [start(pool, f"after-{i}") for i in range(7)] == ["active"] * 7  # a and c: 2 + 5
    assert {row(pool.db, f"after-{i}").account for i in range(7)} == {"a", "c"}
    assert start(pool, "more") == "waiting"


@pytest.mark.broker
@pytest.mark.worker
def test_a_worker_fills_three_accounts_from_the_broker_and_starts_the_eleventh_when_one_frees(
    settings_for: Callable[..., Settings],
    broker_url: str,
    db: Database,
    sim: SimulatorServer,
    tmp_path: Path,
    start_worker: Callable[..., object],
    purge_queues: Callable[[], None],
) -> None:
    """The same through RabbitMQ and a worker process: 10 starts active with no vendor
    rejection, the 11th waits, a stop frees a slot and it starts."""
    from orchestrator.producer import Producer
    from tests.conftest import wait_until

    purge_queues()
    settings = settings_for(
        broker_url=broker_url,
        deepbrain_base_url=sim.base_url,
        deepbrain_app_id=None,
        deepbrain_user_key=None,
        accounts_dir=write_accounts(tmp_path / "accounts"),
        orphan_grace_seconds=5.0,
    )
    start_worker(settings, "--beat")
    producer = Producer(settings)
    try:
        for i in range(10):
            producer.enqueue_start_session(avatar_id="x", request_id=f"w-{i}")

        def statuses() -> list[str]:
            with db.transaction() as session:
                return list(session.scalars(text("SELECT status FROM sessions")))

        wait_until(lambda: statuses().count("active") == 10, timeout=60, what="10 active")
        producer.enqueue_start_session(avatar_id="x", request_id="w-late")
        wait_until(lambda: "waiting" in statuses(), timeout=30, what="the 11th waits")
        freed = next(r.request_id for r in rows_of(db, "c"))  # type: ignore[attr-defined]
        producer.request_stop(request_id=freed)
        wait_until(lambda: row(db, "w-late").status == "active", timeout=30, what="11th starts")
    finally:
        producer.close()
    assert row(db, "w-late").account == "c"
    for name, cap in CAPS.items():
        assert vendor_statuses(sim, name) == {"200": cap + (1 if name == "c" else 0)}


def test_a_slow_account_leaves_the_others_their_share_of_the_reconcile_pass(
    settings_for: Callable[..., Settings], db: Database, sim: SimulatorServer, tmp_path: Path
) -> None:
    """a's list outlasts the whole pass (2 s): a pass that gave it all the time would reach
    no other account; with a share each, c's orphan is still stopped in this pass."""
    lc = inline_lifecycle(
        settings_for(
            deepbrain_base_url=sim.base_url,
            deepbrain_app_id=None,
            deepbrain_user_key=None,
            accounts_dir=write_accounts(tmp_path / "accounts"),
            vendor_timeout_seconds=1.0,
            reconcile_interval_seconds=1.0,
        )
    )
    try:
        app_id, user_key = keys("c")
        with httpx.Client(base_url=sim.base_url, timeout=5) as client:
            token = client.post(
                "/api/v2/sessions/token", json={"appId": app_id, "userKey": user_key}
            ).json()["data"]["session_token"]
            client.post(
                "/api/v2/sessions/start",
                json={"avatar_id": "x"},
                headers={"Authorization": f"Bearer {token}"},
            )
        sim.configure_account("a", endpoint_latency={"list": 5.0})
        report = reconcile(lc)
    finally:
        lc.close()
    assert report.vendor_error  # a's list ran out of its share
    assert report.orphans_stopped == 1
    assert [s["status"] for s in sim.sessions(account="c")] == ["ended"]


def test_a_vendor_limit_below_ours_lowers_the_cap_at_the_first_refusal_and_the_start_moves_on(
    pool: Lifecycle, sim: SimulatorServer
) -> None:
    """Two sessions held on a by someone else (a's vendor limit is 2): our first start there
    is refused (403/4030); a's cap drops to what it has live at once, and the request goes
    back to waiting and then starts elsewhere. A quiet reconcile pass raises the cap again."""
    from orchestrator.lifecycle import admit_waiting

    app_id, user_key = keys("a")
    with httpx.Client(base_url=sim.base_url, timeout=5) as client:
        token = client.post(
            "/api/v2/sessions/token", json={"appId": app_id, "userKey": user_key}
        ).json()["data"]["session_token"]
        for _ in range(2):
            client.post(
                "/api/v2/sessions/start",
                json={"avatar_id": "elsewhere"},
                headers={"Authorization": f"Bearer {token}"},
            )
    assert start(pool, "first") == "waiting"  # a won the tie and refused it
    states = {s.name: s for s in store.account_states(pool.db)}
    assert states["a"].effective_cap == 1  # the refused attempt still counted
    for _ in range(3):  # each pass admits (and may bounce once more) until it is live
        admit_waiting(pool)
        if row(pool.db, "first").status == "active":
            break
    first = row(pool.db, "first")
    assert (first.status, first.account) == ("active", "b")
    assert vendor_statuses(sim, "a").get("403", 0) <= 2
    assert {s.name: s for s in store.account_states(pool.db)}["a"].effective_cap == 0
    with pool.db.transaction() as session:  # no limit reply for longer than an interval
        session.execute(
            text("UPDATE vendor_accounts SET last_error_at = now() - interval '1 hour'")
        )
    reconcile(pool)  # (it also stops the two sessions it sees no row for: orphans to us)
    assert {s.name: s for s in store.account_states(pool.db)}["a"].effective_cap == 1


def test_a_rotated_key_is_used_without_a_restart(
    pool: Lifecycle, sim: SimulatorServer, tmp_path: Path
) -> None:
    """The vendor and the mounted definition of b move to a new key together: the next call
    on b uses it (a new client, its own token), the lifecycle is not rebuilt."""
    assert start(pool, "before", account="b") == "active"
    sim.configure_account("b", app_id="app-b-2", user_key="key-b-2")
    definition = {"app_id": "app-b-2", "user_key": "key-b-2", "cap": 3, "labels": LABELS["b"]}
    (tmp_path / "accounts" / "b.json").write_text(json.dumps(definition))
    time.sleep(1.1)  # the catalog is checked at most once a second
    assert start(pool, "after", account="b") == "active"
    request_stop(pool, request_id="before")  # a session of the old key, stopped with the new
    assert row(pool.db, "before").status == "ended"
    assert {s.name: s.health for s in store.account_states(pool.db)}["b"] == "ok"


def test_a_pool_wide_start_its_account_fails_waits_for_that_list_then_goes_anywhere(
    pool: Lifecycle, sim: SimulatorServer
) -> None:
    """Account a answers 5xx to every call. A pool-wide start it fails is not failed: a 5xx
    is uncertain (a may have made a session), so the request waits bound to a until a's list
    has been read, then any account may take it; a's circuit opens and the others serve the
    rest meanwhile. Nothing fails."""
    from orchestrator.lifecycle import admit_waiting

    sim.configure_account("a", server_errors=True)
    outcomes = [start(pool, f"p-{i}") for i in range(6)]
    assert "failed" not in outcomes, outcomes
    bound = [f"p-{i}" for i, outcome in enumerate(outcomes) if outcome == "waiting"]
    assert 1 <= len(bound) <= 3, outcomes  # a would win every tie by name until cut off
    for rid in bound:
        held = row(pool.db, rid)
        assert (held.status, held.account) == ("waiting", "a")
        assert held.uncertain_at is not None
    # b and c have free slots, but a's list cannot be read: the bound requests stay on a.
    reconcile(pool)
    admit_waiting(pool)
    assert [(row(pool.db, rid).status, row(pool.db, rid).account) for rid in bound] == [
        ("waiting", "a")
    ] * len(bound)
    sim.configure_account("a", server_errors=False)
    reconcile(pool)  # a's list is read: its circuit closes and the bound requests go free
    admit_waiting(pool)
    assert [row(pool.db, f"p-{i}").status for i in range(6)] == ["active"] * 6


def test_a_start_naming_an_unhealthy_account_waits_for_it_until_its_deadline(
    pool: Lifecycle, sim: SimulatorServer
) -> None:
    """Account a answers 5xx to every call. A start that names a is not failed: it waits
    for a alone (the failure uncertain, so bound to a in any case) while a's circuit opens,
    and goes active on a once a good list closes it. One that names a and whose deadline
    passes while a is still sick fails then, naming a."""
    from orchestrator.lifecycle import admit_waiting

    sim.configure_account("a", server_errors=True)
    assert start(pool, "named", account="a") == "waiting"
    assert start(pool, "short", account="a", start_deadline_seconds=2) == "waiting"
    for _ in range(3):  # admission passes try a again while its circuit is closed
        admit_waiting(pool)
    assert {s.name: s.health for s in store.account_states(pool.db)}["a"] == "circuit-open"
    named = row(pool.db, "named")
    assert (named.status, named.account) == ("waiting", "a")
    deadline = time.monotonic() + 10
    while row(pool.db, "short").status == "waiting" and time.monotonic() < deadline:
        time.sleep(0.2)
        admit_waiting(pool)
    short = row(pool.db, "short")
    assert (short.status, short.error_code) == ("failed", "CAPACITY_TIMEOUT")
    assert "account a" in (short.error_message or ""), short.error_message
    assert "circuit open" in (short.error_message or ""), short.error_message
    sim.configure_account("a", server_errors=False)
    reconcile(pool)  # a's list succeeds: the circuit closes
    admit_waiting(pool)
    named = row(pool.db, "named")
    assert (named.status, named.account) == ("active", "a")
