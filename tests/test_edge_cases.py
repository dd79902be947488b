"""The edge cases of a start request's life, each against real Postgres and the simulator (or
respx at the HTTP boundary): a stop that overtakes its start, values Postgres cannot store,
secrets in odd shapes, admission timing, one vendor attempt at a time, deadlines, and the
reconciler's robustness. The cases that need a worker process, a broker or a crashing
Postgres live in tests/faults/test_edge_*.py."""

from __future__ import annotations

import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import respx
from sqlalchemy import text
from sqlalchemy.exc import DataError

from orchestrator.config import Settings
from orchestrator.db import Database, SessionRow
from orchestrator.deepbrain import DeepBrainClient, DeepBrainError, RetryPolicy
from orchestrator.lifecycle import (
    DispatchAfterCommit,
    Lifecycle,
    RetryLater,
    admit_waiting,
    handle_start_message,
    reconcile,
    request_stop,
    run_start,
)
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.simulator import SimulatorServer
from tests.conftest import APP_ID, USER_KEY, wait_until
from tests.helpers import event_kinds, insert_live_row, outbox_bodies, row, row_or_none, rows
from tests.threads import in_background, race

pytestmark = pytest.mark.postgres

SECRET = "sk-customer-secret-4f1c"


def start(lc: Lifecycle, claim_id: str = "task-1", **kwargs: Any) -> Any:
    kwargs.setdefault("avatar_id", "avatar-a")
    return handle_start_message(lc, (), dict(kwargs), claim_id=claim_id)


def everything_stored(db: Database) -> str:
    """Every row of every table the service writes, as text."""
    with db.transaction() as session:
        return "\n".join(
            str(
                session.execute(
                    text(f"SELECT coalesce(string_agg(t::text, '|'), '') FROM {t} t")
                ).scalar_one()
            )
            for t in ("sessions", "session_events", "event_outbox", "early_stops")
        )


class RecordingDispatcher:
    """A dispatcher that only records what the lifecycle hands on (a queue the test drains)."""

    def __init__(self) -> None:
        self.admitted: list[tuple[uuid.UUID, str]] = []
        self.admit_calls = 0

    def admit_waiting(self) -> None:
        self.admit_calls += 1

    def start_admitted(self, session_id: uuid.UUID, claim_id: str) -> None:
        self.admitted.append((session_id, claim_id))

    def publish_events(self) -> None:
        pass


@pytest.fixture
def recorded(settings_for: Callable[..., Settings], db: Database) -> Iterator[Any]:
    """A lifecycle (cap 1, start timeout 1 s) whose dispatches are recorded, not run."""
    dispatcher = RecordingDispatcher()
    lc = Lifecycle.from_settings(
        settings_for(max_concurrent_sessions=1, start_timeout_seconds=1.0), dispatcher
    )
    yield lc, dispatcher
    lc.close()


# -- 1. a stop that overtakes its start ------------------------------------------------------


def test_stop_that_overtakes_its_start_cancels_it_without_a_vendor_call(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    stopped = request_stop(lifecycle, request_id="early", reason="USER_CLOSED")
    assert not stopped.found and stopped.remembered

    outcome = start(lifecycle, request_id="early")

    assert outcome.status == "ended"
    r = row(lifecycle.db, "early")
    assert (r.status, r.end_reason, r.vendor_session_id) == ("ended", "USER_CLOSED", None)
    assert simulator.sessions() == []
    (ended,) = outbox_bodies(lifecycle.db, "early")
    assert (ended["status"], ended["end_reason"]) == ("ended", "USER_CLOSED")
    # The cancellation was used up: a stop remembered once ends one request once.
    with lifecycle.db.transaction() as session:
        assert session.execute(text("SELECT count(*) FROM early_stops")).scalar_one() == 0


def test_an_early_stop_and_its_start_racing_never_leave_a_session_billing(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    simulator.configure(endpoint_latency="start=0.2")
    actions: list[Callable[[], object]] = []
    for i in range(12):
        rid = f"race-{i}"
        actions += [
            lambda rid=rid: request_stop(lifecycle, request_id=rid),
            lambda rid=rid: start(lifecycle, f"t-{rid}", request_id=rid),
        ]
    race(*actions)  # what any of them raises fails the test
    assert {r.status for r in rows(lifecycle.db)} == {"ended"}
    assert [s for s in simulator.sessions() if s["status"] == "active"] == []


# -- 2. values the database cannot store -----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"metadata": {"score": math.nan}}, "metadata.score"),
        (
            {"avatar_persona": {"llm_configurations": {"temperature": math.inf}}},
            "avatar_persona.llm_configurations.temperature",
        ),
        ({"avatar_persona": {"future": [1.0, -math.inf]}}, "avatar_persona.future[1]"),
        ({"start_deadline_seconds": 10**18}, "start_deadline_seconds"),
    ],
)
def test_values_postgres_cannot_store_make_a_failed_row_naming_the_field(
    lifecycle: Lifecycle, simulator: SimulatorServer, kwargs: dict[str, Any], field: str
) -> None:
    outcome = start(lifecycle, request_id="odd", **kwargs)
    assert outcome.status == "failed"
    r = row(lifecycle.db, "odd")
    assert (r.status, r.error_code) == ("failed", "VALIDATION_ERROR")
    assert f"'{field}'" in (r.error_message or ""), r.error_message
    assert simulator.sessions() == []
    assert [b["status"] for b in outbox_bodies(lifecycle.db, "odd")] == ["failed"]


# -- 3. secrets in errors and rows -----------------------------------------------------------


def persona_with_secrets() -> dict[str, Any]:
    return {
        "llm_configurations": {
            "provider": "custom",
            "custom_http": {
                "endpoint": "https://llm.example/v1",
                "headers": {"Authorization": f"Bearer {SECRET}"},
                "extra_headers": {"x-key": SECRET},
                "auth_plugins": [{"kind": "static", "key": SECRET}],
            },
        }
    }


def test_positional_body_leaves_no_secret_in_any_table(lifecycle: Lifecycle) -> None:
    kwargs = {"avatar_id": "a", "request_id": "pos", "avatar_persona": persona_with_secrets()}
    outcome = handle_start_message(lifecycle, (kwargs,), {}, claim_id="t-pos")
    assert outcome.status == "failed"
    assert SECRET not in everything_stored(lifecycle.db)


@pytest.mark.parametrize(
    "kwargs",
    [
        # an unknown top-level field carrying a custom_http block: invalid, stored as received
        {"avatar_id": "a", "llm": {"custom_http": {"headers": {"k": SECRET}}}},
        # custom_http one level too high: valid (unknown nested fields pass through)
        {"avatar_id": "a", "avatar_persona": {"custom_http": {"auth_plugins": [SECRET]}}},
        # a list where an object belongs: invalid
        {"avatar_id": "a", "avatar_persona": [persona_with_secrets()]},
    ],
    ids=["unknown-field", "misplaced-custom-http", "persona-list"],
)
def test_secrets_in_any_shape_are_stored_nowhere(
    lifecycle: Lifecycle, simulator: SimulatorServer, kwargs: dict[str, Any]
) -> None:
    start(lifecycle, request_id="shape", **kwargs)
    assert row(lifecycle.db, "shape").status in ("active", "failed")
    assert SECRET not in everything_stored(lifecycle.db)


def test_sql_parameters_never_reach_exception_text(db: Database) -> None:
    with pytest.raises(DataError) as raised, db.transaction() as session:
        session.execute(text("SELECT 1 / 0, :secret"), {"secret": SECRET})
    assert SECRET not in str(raised.value)
    assert SECRET not in repr(raised.value)


# -- 5. admitted requests are timed from admission -------------------------------------------


def test_a_request_that_waited_long_is_not_failed_between_admission_and_its_start(
    recorded: Any, simulator: SimulatorServer
) -> None:
    lc, dispatcher = recorded
    start(lc, "t-1", request_id="first")
    assert start(lc, "t-2", request_id="second").status == "waiting"
    time.sleep(1.5)  # longer than START_TIMEOUT_SECONDS (1 s) in the queue
    request_stop(lc, request_id="first")
    assert admit_waiting(lc).admitted == 1
    assert row(lc.db, "second").status == "starting"

    reconcile(lc)  # runs before the admitted start does

    assert row(lc.db, "second").status == "starting"
    ((session_id, claim_id),) = dispatcher.admitted
    run_start(lc, session_id, claim_id)
    assert row(lc.db, "second").status == "active"


def test_an_admitted_request_whose_dispatch_was_lost_is_dispatched_again(
    recorded: Any, simulator: SimulatorServer
) -> None:
    lc, dispatcher = recorded
    start(lc, "t-1", request_id="first")
    start(lc, "t-2", request_id="second")
    request_stop(lc, request_id="first")
    admit_waiting(lc)
    dispatcher.admitted.clear()  # the worker died before the start message left

    time.sleep(1.5)  # the start timeout passes with no attempt
    reconcile(lc)

    r = row(lc.db, "second")
    assert (r.status, r.error_code) == ("starting", None)
    ((session_id, claim_id),) = dispatcher.admitted
    assert session_id == r.id
    run_start(lc, session_id, claim_id)
    assert row(lc.db, "second").status == "active"


# -- 6. one vendor attempt at a time ---------------------------------------------------------


def first_delivery_in_flight(lc: Lifecycle, db: Database, request_id: str) -> Future[Any]:
    """Start ``request_id`` (task ``same-task``) in a thread; return once its vendor call
    has been sent. The future gives what that first delivery returned (or raised)."""
    first = in_background(lambda: start(lc, "same-task", request_id=request_id))
    wait_until(lambda: (r := row_or_none(db, request_id)) and r.attempts > 0, 5, 0.01)
    return first


def test_a_redelivery_during_the_attempt_waits_for_it_instead_of_calling_the_vendor(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    simulator.configure(endpoint_latency="start=1.0")
    first = first_delivery_in_flight(lifecycle, lifecycle.db, "r")

    with pytest.raises(RetryLater) as retry:
        start(lifecycle, "same-task", request_id="r")  # the same message, redelivered
    assert first.result(timeout=30).status == "active"

    assert 0 < retry.value.delay <= lifecycle.settings.start_timeout_seconds + 1.5  # + jitter
    assert len(simulator.sessions()) == 1
    assert row(lifecycle.db, "r").status == "active"
    # Once the first attempt is recorded the redelivery has nothing left to do.
    assert start(lifecycle, "same-task", request_id="r").status == "active"
    assert len(simulator.sessions()) == 1


def test_a_redelivery_with_another_payload_is_a_conflict_not_a_resume(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    simulator.configure(endpoint_latency="start=0.5")
    first = first_delivery_in_flight(lifecycle, lifecycle.db, "r")
    outcome = start(lifecycle, "same-task", request_id="r", avatar_id="someone-else")
    assert first.result(timeout=30).status == "active"
    assert outcome.detail == "conflict"
    assert event_kinds(lifecycle.db, "r").count("duplicate_conflict") == 1
    assert len(simulator.sessions()) == 1


# -- 7. deadlines that add up ----------------------------------------------------------------


def test_a_start_call_keeps_its_total_deadline_across_a_token_refresh(
    simulator: SimulatorServer,
) -> None:
    """token + start (401) + token + start: each phase on time, the sum not."""
    with DeepBrainClient(simulator.base_url, APP_ID, USER_KEY, timeout_seconds=10) as client:
        client.start_session({"avatar_id": "warm-up"})  # caches a session token
        simulator.revoke_tokens()
        simulator.configure(endpoint_latency="start=1.2,token=1.2")
        began = time.monotonic()
        with pytest.raises(DeepBrainError):
            client.start_session({"avatar_id": "a"}, deadline=began + 3.0)
        elapsed = time.monotonic() - began
    # Without a total deadline the call takes 3 x 1.2 s and succeeds.
    assert elapsed < 3.0 + 0.6, elapsed


@pytest.fixture
def trickling_vendor() -> Iterator[str]:
    """A server that answers every request, one byte of its reply every 0.2 s: each read of
    the reply is quick, so only a total deadline can cut the request short."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()
    body = b'{"code": 1000, "message": "ok", "data": {"results": []}}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    reply = head % len(body) + body

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                for byte in reply:
                    if stop.is_set():
                        break
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    listener.close()


def test_every_vendor_request_has_a_total_deadline(trickling_vendor: str) -> None:
    """httpx's timeouts are per read: a reply that trickles in never trips them. The request
    must still end within VENDOR_TIMEOUT_SECONDS in all (here 1 s, the reply takes ~30 s)."""
    retry = RetryPolicy(max_attempts=1)
    with DeepBrainClient(
        trickling_vendor, APP_ID, USER_KEY, timeout_seconds=1.0, retry=retry
    ) as client:
        began = time.monotonic()
        with pytest.raises(DeepBrainError) as raised:
            client.list_sessions("active")
        elapsed = time.monotonic() - began
    assert raised.value.error_code == "VENDOR_TIMEOUT"
    assert elapsed < 1.0 + 0.5, elapsed


# -- 8. the reconciler never stops for one bad row -------------------------------------------

LIST_URL = "http://vendor.test/api/v2/sessions"


def old(seconds: float = 600) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


@pytest.fixture
def respx_lifecycle(settings_for: Callable[..., Settings], db: Database) -> Iterator[Lifecycle]:
    lc = inline_lifecycle(settings_for(deepbrain_base_url="http://vendor.test"))
    yield lc
    lc.close()


def envelope(data: Any) -> dict[str, Any]:
    return {"code": 1000, "message": "ok", "data": data}


def test_one_malformed_row_in_the_vendor_list_does_not_stop_the_pass(
    respx_lifecycle: Lifecycle,
) -> None:
    lc = respx_lifecycle
    insert_live_row(lc.db, "gone", "vendor-gone")
    rows_listed = [
        {"sessionId": None, "created_at": old()},
        {"sessionId": "bad-time", "created_at": "yesterday-ish"},
        {"sessionId": "orphan-1", "created_at": old()},
    ]
    with respx.mock(assert_all_called=False) as vendor:
        vendor.get(LIST_URL).respond(json=envelope({"results": rows_listed, "next": None}))
        vendor.get(f"{LIST_URL}/vendor-gone").respond(
            json=envelope({"sessionId": "vendor-gone", "end_at": old(5), "end_reason": "ERROR"})
        )
        stop = vendor.post(f"{LIST_URL}/stop").respond(json=envelope(None))
        report = reconcile(lc)
    assert report.skipped_rows == 1  # the row with no id; the other is listed, not aged
    assert report.orphans_stopped == 1 and stop.call_count == 1
    assert report.vendor_ended == 1
    assert row(lc.db, "gone").status == "ended"


def test_stuck_starts_are_resolved_even_when_the_vendor_list_fails(
    respx_lifecycle: Lifecycle,
) -> None:
    lc = respx_lifecycle
    with lc.db.transaction() as session:
        session.add(
            SessionRow(
                request_id="stuck",
                status="starting",
                avatar_id="a",
                request_payload={"avatar_id": "a"},
                payload_sha256="0" * 64,
                attempts=1,
                created_at=datetime.now(UTC) - timedelta(hours=1),
                start_sent_at=datetime.now(UTC) - timedelta(hours=1),
                admitted_at=datetime.now(UTC) - timedelta(hours=1),
                attempt_owner="a-worker-that-died",
                attempt_lease_until=datetime.now(UTC) - timedelta(hours=1),
            )
        )
    with respx.mock() as vendor:
        vendor.get(LIST_URL).respond(status_code=400, json={"code": 4000, "message": "nope"})
        report = reconcile(lc)
    assert report.vendor_error and report.start_timeouts == 1
    r = row(lc.db, "stuck")
    assert (r.status, r.error_code) == ("failed", "START_TIMEOUT")


def test_one_reconcile_pass_at_a_time_across_the_deployment(
    settings_for: Callable[..., Settings], db: Database, simulator: SimulatorServer
) -> None:
    simulator.configure(endpoint_latency="list=1.0")
    lcs = [inline_lifecycle(settings_for()) for _ in range(3)]
    try:
        reports = race(*[lambda lc=lc: reconcile(lc) for lc in lcs])
    finally:
        for lc in lcs:
            lc.close()
    assert simulator.stats()["endpoints"]["list"]["calls"] == 1
    assert sorted(r.skipped_pass for r in reports) == [False, True, True]


def test_a_reconcile_pass_is_bounded_in_time_however_slow_the_vendor(
    settings_for: Callable[..., Settings], db: Database, simulator: SimulatorServer
) -> None:
    lc = inline_lifecycle(settings_for(vendor_timeout_seconds=1.0, reconcile_interval_seconds=1.0))
    try:
        for i in range(20):
            insert_live_row(lc.db, f"r-{i}", f"not-listed-{i}")
        simulator.configure(endpoint_latency="detail=0.8")
        began = time.monotonic()
        report = reconcile(lc)
        elapsed = time.monotonic() - began
    finally:
        lc.close()
    # 20 detail calls of 0.8 s would take 16 s; the pass stops at its deadline (2 s here).
    assert elapsed < 5.0, elapsed
    assert report.out_of_time


# -- 9. a pool timeout is an outage, never a reason to stop a good session -------------------


def test_a_pool_timeout_while_recording_a_start_does_not_stop_the_session(
    settings_for: Callable[..., Settings],
    database_url: str,
    db: Database,
    simulator: SimulatorServer,
) -> None:
    simulator.configure(endpoint_latency="start=0.5")
    dispatcher = RecordingDispatcher()
    lc = Lifecycle(
        settings=settings_for(orphan_grace_seconds=60.0),  # the wait must fit the grace
        db=Database(
            database_url,
            pool_size=1,
            max_overflow=0,
            pool_timeout=0.3,
            hooks=DispatchAfterCommit(dispatcher),
        ),
        vendor=DeepBrainClient(simulator.base_url, APP_ID, USER_KEY, timeout_seconds=5),
        dispatcher=dispatcher,
    )
    try:
        started = first_delivery_in_flight(lc, db, "busy")
        # Another thread of the worker holds the only connection through the vendor's reply.
        with lc.db.engine.connect():
            time.sleep(1.5)
        assert started.result(timeout=30).status == "active"
    finally:
        lc.close()
    r = row(db, "busy")
    assert r.status == "active"
    assert simulator.sessions()[0]["status"] == "active"


# -- 7. settings that contradict each other fail at start ------------------------------------


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (
            {
                "ORCHESTRATOR_ORPHAN_GRACE_SECONDS": "10",
                "ORCHESTRATOR_VENDOR_TIMEOUT_SECONDS": "30",
            },
            ("ORCHESTRATOR_ORPHAN_GRACE_SECONDS", "ORCHESTRATOR_VENDOR_TIMEOUT_SECONDS"),
        ),
        (
            {
                "ORCHESTRATOR_START_TIMEOUT_SECONDS": "40",
                "ORCHESTRATOR_VENDOR_TIMEOUT_SECONDS": "30",
            },
            ("ORCHESTRATOR_START_TIMEOUT_SECONDS", "ORCHESTRATOR_VENDOR_TIMEOUT_SECONDS"),
        ),
        (
            {"ORCHESTRATOR_STOP_RETRY_SECONDS": "20", "ORCHESTRATOR_VENDOR_TIMEOUT_SECONDS": "30"},
            ("ORCHESTRATOR_STOP_RETRY_SECONDS", "ORCHESTRATOR_VENDOR_TIMEOUT_SECONDS"),
        ),
    ],
    ids=["orphan-grace", "start-timeout", "stop-lease"],
)
@pytest.mark.parametrize("command", ["worker", "beat"])
def test_contradicting_settings_fail_at_start_with_one_line(
    tmp_path: Any, env: dict[str, str], names: tuple[str, ...], command: str
) -> None:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    clean.update(
        ORCHESTRATOR_STATE_DIR=str(tmp_path),
        ORCHESTRATOR_DEEPBRAIN_APP_ID="app",
        ORCHESTRATOR_DEEPBRAIN_USER_KEY="key",
        ORCHESTRATOR_DEEPBRAIN_BASE_URL="http://127.0.0.1:9",
        **env,
    )
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", command],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(name in lines[0] for name in names), lines[0]
