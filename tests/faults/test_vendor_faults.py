"""Vendor faults, scripted in the simulator: rate limits, server errors, timeouts, refusals,
rejected session tokens, stops of sessions that are already gone, and a vendor that hangs.

Most cases drive the lifecycle functions directly (real Postgres, the simulator over HTTP);
the hanging vendor also runs through real worker processes of each pool kind, because what
ends the call there is the HTTP timeout, not Celery's time limits (which the threads pool lacks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from typing import Any

import pytest

from orchestrator import store
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.lifecycle import Lifecycle, handle_start_message, reconcile, request_stop
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.conftest import WorkerProcess
from tests.faults.conftest import (
    FAULT_ACCOUNTS,
    SECOND_ACCOUNT,
    audit_vendor,
    event_counts,
    rows_by_request,
    wait_settled,
)

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

MAX_ATTEMPTS = 4  # the client's default RetryPolicy: bounded retries
MAX_BACKOFF_TOTAL = 0.5 + 1.0 + 2.0  # its capped delays before retries 2, 3 and 4
MIN_BACKOFF_TOTAL = MAX_BACKOFF_TOTAL / 2  # the same with the least jitter ("equal" jitter)


def one_account_serving(db: Database) -> None:
    """These tests hold what one account's failures do to a request. With two accounts
    (FAULTS_ACCOUNTS=2) a pool-wide request that its account fails waits for the other one
    (reliability row 82), and one that names its account waits for it (row 93), both tested
    in test_accounts_admission.py; so here the second account is drained, and the request
    has nowhere else to go, as with one account."""
    if FAULT_ACCOUNTS == 2:
        assert store.switch(db, SECOND_ACCOUNT, store.Switch.DRAIN), "no second account row"


@pytest.fixture
def lc_for(
    settings_for: Callable[..., Settings], db: Database
) -> Iterator[Callable[..., Lifecycle]]:
    made: list[Lifecycle] = []

    def make(**overrides: Any) -> Lifecycle:
        made.append(inline_lifecycle(settings_for(**overrides)))
        return made[-1]

    yield make
    for lc in made:
        lc.close()


@pytest.fixture
def start_times(simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Wall-clock times at which the simulator received each ``start`` request."""
    times: list[float] = []
    original = simulator.state.begin_request

    def recording(endpoint: str) -> None:
        if endpoint == "start":
            times.append(time.time())
        original(endpoint)

    monkeypatch.setattr(simulator.state, "begin_request", recording)
    return times


def start(lc: Lifecycle, request_id: str, **kwargs: Any) -> Any:
    kwargs.setdefault("avatar_id", "avatar-f")
    one_account_serving(lc.db)
    started = time.monotonic()
    handle_start_message(lc, (), {"request_id": request_id, **kwargs}, claim_id=f"t-{request_id}")
    row = rows_by_request(lc.db, [request_id])[request_id]
    return row, time.monotonic() - started


def start_statuses(sim: SimulatorServer) -> dict[str, int]:
    return dict(sim.stats()["endpoints"]["start"]["statuses"])


def wait_vendor_idle(sim: SimulatorServer, timeout: float = 10) -> None:
    """Let hanging requests finish, so they cannot create sessions in a later test."""
    deadline = time.monotonic() + timeout
    while any(e["in_flight"] for e in sim.stats()["endpoints"].values()):
        assert time.monotonic() < deadline, "simulator requests still in flight"
        time.sleep(0.05)


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_waits_at_least_retry_after_then_starts(
    lc_for: Callable[..., Lifecycle],
    simulator: SimulatorServer,
    start_times: list[float],
    form: str,
) -> None:
    if form == "seconds":
        retry_after, not_before = "2", None
    else:  # an HTTP date (whole seconds): the retry must not come before that instant
        not_before = float(int(time.time()) + 2)
        retry_after = formatdate(not_before, usegmt=True)
    simulator.push_fault({"endpoint": "start", "status": 429, "retry_after": retry_after})
    row, _ = start(lc_for(), "rate-limited")
    assert row.status == "active"
    assert start_statuses(simulator) == {"429": 1, "200": 1}
    assert len(start_times) == 2
    if not_before is None:
        assert start_times[1] - start_times[0] >= 2.0
    else:
        assert start_times[1] >= not_before - 0.01  # (clock read at slightly different moments)


def test_429_without_end_fails_after_bounded_retries(
    lc_for: Callable[..., Lifecycle], simulator: SimulatorServer
) -> None:
    simulator.push_fault(
        {"endpoint": "start", "status": 429, "retry_after": "0", "count": 2 * MAX_ATTEMPTS}
    )
    row, _ = start(lc_for(), "always-429")
    assert (row.status, row.error_code) == ("failed", "VENDOR_4290")
    assert start_statuses(simulator) == {"429": MAX_ATTEMPTS}


@pytest.mark.parametrize(
    ("fault", "error_code", "message"),
    [
        ({"status": 500, "code": 5000}, "VENDOR_5000", "SESSION_ROOM_NOT_FOUND"),
        ({"status": 503, "code": 5000, "message": "maintenance"}, "VENDOR_5000", "maintenance"),
        ({"status": 502, "raw_body": "<html>Bad Gateway</html>"}, "VENDOR_HTTP_502", "non-JSON"),
    ],
    ids=["500", "503", "502-proxy-page"],
)
def test_5xx_is_retried_a_bounded_number_of_times_then_fails_with_the_vendor_code(
    lc_for: Callable[..., Lifecycle],
    simulator: SimulatorServer,
    fault: dict[str, Any],
    error_code: str,
    message: str,
) -> None:
    simulator.push_fault({"endpoint": "start", "count": 2 * MAX_ATTEMPTS, **fault})
    row, took = start(lc_for(), "server-error")
    assert (row.status, row.error_code) == ("failed", error_code)
    assert message in (row.error_message or "")
    assert sum(start_statuses(simulator).values()) == MAX_ATTEMPTS
    assert took < MAX_BACKOFF_TOTAL + 3
    assert row.livekit_token is None and simulator.sessions() == []


def test_start_retries_stop_in_time_for_the_start_timeout(
    lc_for: Callable[..., Lifecycle], simulator: SimulatorServer
) -> None:
    """Four attempts take at least MIN_BACKOFF_TOTAL (1.75 s) of backoff, longer than this
    START_TIMEOUT: the worker stops retrying before the reconciler would fail the row, and
    fails it with the vendor's code. The timeout is as long as it can be while four attempts
    still overrun it, so the time bound leaves the machine all the slack it can."""
    start_timeout = 1.5
    assert start_timeout < MIN_BACKOFF_TOTAL
    simulator.push_fault({"endpoint": "start", "status": 503, "code": 5000, "count": 10})
    lc = lc_for(start_timeout_seconds=start_timeout, vendor_timeout_seconds=0.5)
    row, took = start(lc, "deadline")
    assert (row.status, row.error_code) == ("failed", "VENDOR_5000")
    assert 1 <= sum(start_statuses(simulator).values()) < MAX_ATTEMPTS
    assert took < start_timeout


def test_timeouts_are_bounded_and_the_sessions_they_made_are_stopped(
    lc_for: Callable[..., Lifecycle], simulator: SimulatorServer
) -> None:
    """A read timeout is an uncertain start: the vendor goes on and creates the session."""
    lc = lc_for(vendor_timeout_seconds=0.5)
    simulator.push_fault({"endpoint": "start", "delay_seconds": 1.5, "count": 2 * MAX_ATTEMPTS})
    row, took = start(lc, "hanging")
    assert (row.status, row.error_code) == ("failed", "VENDOR_TIMEOUT")
    assert "no reply within 0.5s" in (row.error_message or "")
    assert took < MAX_ATTEMPTS * 0.5 + MAX_BACKOFF_TOTAL + 2
    wait_vendor_idle(simulator)
    made = simulator.sessions("active")
    assert len(made) == MAX_ATTEMPTS  # every timed-out attempt made a session nobody recorded
    assert reconcile(lc).orphans_stopped == MAX_ATTEMPTS
    assert {s["end_reason"] for s in simulator.sessions()} == {"ZOMBIE_SESSION_REAP"}


@pytest.mark.parametrize(
    "disconnect", [False, True], ids=["500-after-create", "dropped-after-create"]
)
def test_uncertain_start_makes_a_duplicate_that_the_reconciler_stops(
    lc_for: Callable[..., Lifecycle], simulator: SimulatorServer, disconnect: bool
) -> None:
    """The vendor created the session, then answered 500 (or dropped the connection): the
    retry makes a second one. The row records one; the other is found and stopped."""
    lc = lc_for()
    simulator.push_fault({"endpoint": "start", "after_create": True, "disconnect": disconnect})
    row, _ = start(lc, "uncertain")
    assert row.status == "active"
    first, second = simulator.sessions()
    assert row.vendor_session_id == second["session_id"]
    assert reconcile(lc).orphans_stopped == 1
    by_id = {s["session_id"]: s for s in simulator.sessions()}
    assert by_id[first["session_id"]]["end_reason"] == "ZOMBIE_SESSION_REAP"
    assert by_id[second["session_id"]]["status"] == "active"
    assert rows_by_request(lc.db, ["uncertain"])["uncertain"].status == "active"


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, 4000, "avatar 'nobody' does not exist"),
        (422, 4000, "greeting_text too long"),
        (402, 4020, "out of credits, top up"),
        (404, 4040, "no such avatar"),
    ],
)
def test_4xx_is_not_retried_and_fails_with_the_vendors_message(
    lc_for: Callable[..., Lifecycle],
    simulator: SimulatorServer,
    status: int,
    code: int,
    message: str,
) -> None:
    simulator.push_fault({"endpoint": "start", "status": status, "code": code, "message": message})
    row, _ = start(lc_for(), "refused")
    assert (row.status, row.error_code) == ("failed", f"VENDOR_{code}")
    assert message in (row.error_message or "")
    assert start_statuses(simulator) == {str(status): 1}


def test_revoked_session_token_is_refreshed_once(
    lc_for: Callable[..., Lifecycle], simulator: SimulatorServer
) -> None:
    lc = lc_for()
    # Both on one account: a token is per account (with two, routing would spread them).
    assert start(lc, "before-revoke", account="default")[0].status == "active"
    simulator.revoke_tokens()
    assert start(lc, "after-revoke", account="default")[0].status == "active"
    stats = simulator.stats()["endpoints"]
    assert stats["token"]["calls"] == 2
    assert stats["start"]["statuses"] == {"200": 2, "401": 1}


def test_token_rejected_again_after_the_refresh_fails_the_request(
    lc_for: Callable[..., Lifecycle], simulator: SimulatorServer
) -> None:
    simulator.push_fault({"endpoint": "start", "status": 401, "code": 4010, "count": 5})
    row, _ = start(lc_for(), "unauthorised")
    assert (row.status, row.error_code) == ("failed", "VENDOR_4010")
    stats = simulator.stats()["endpoints"]
    assert stats["token"]["calls"] == 2  # the first token, and exactly one refresh
    assert stats["start"]["statuses"] == {"401": 2}


@pytest.mark.parametrize(("status", "code"), [(409, 4090), (404, 4040)])
def test_stop_answering_409_or_404_counts_as_already_stopped(
    lc_for: Callable[..., Lifecycle], simulator: SimulatorServer, status: int, code: int
) -> None:
    lc = lc_for()
    assert start(lc, "gone")[0].status == "active"
    simulator.push_fault({"endpoint": "stop", "status": status, "code": code})
    simulator.push_fault({"endpoint": "detail", "status": 404, "code": 4040})  # a 404 agrees
    request_stop(lc, request_id="gone")
    row = rows_by_request(lc.db, ["gone"])["gone"]
    assert (row.status, row.end_reason, row.stop_attempts) == ("ended", "USER_CLOSED", 0)
    assert event_counts(lc.db, ("ended",)) == {("gone", "ended"): 1}


def test_stop_404_while_our_key_is_refused_is_not_taken_as_gone(
    lc_for: Callable[..., Lifecycle], simulator: SimulatorServer
) -> None:
    lc = lc_for()
    assert start(lc, "unsure")[0].status == "active"
    simulator.push_fault({"endpoint": "stop", "status": 404, "code": 4040})
    simulator.push_fault({"endpoint": "detail", "status": 401, "code": 4010})
    request_stop(lc, request_id="unsure")
    row = rows_by_request(lc.db, ["unsure"])["unsure"]
    assert (row.status, row.stop_attempts) == ("stopping", 1)


@pytest.mark.broker
@pytest.mark.worker
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_hanging_vendor_cannot_hang_a_request_whatever_the_pool(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    big_vendor: SimulatorServer,
    clean_queues: None,
    pool: str,
) -> None:
    settings = fault_settings(vendor_timeout_seconds=0.5)
    start_worker(settings, "--pool", pool, "--concurrency", "2")
    big_vendor.push_fault({"endpoint": "start", "delay_seconds": 1.0, "count": MAX_ATTEMPTS})
    one_account_serving(db)
    producer = Producer(settings)
    try:
        producer.enqueue_start_session(request_id="slow", avatar_id="a")
        started = time.monotonic()
        row = wait_settled(db, ["slow"], timeout=20, allowed=("failed",))["slow"]
        took = time.monotonic() - started
        # ...and the worker still serves the next request once the vendor answers again.
        wait_vendor_idle(big_vendor)
        producer.enqueue_start_session(request_id="fast", avatar_id="a")
        assert wait_settled(db, ["fast"], timeout=20)["fast"].status == "active"
    finally:
        producer.close()
    assert (row.error_code, row.status) == ("VENDOR_TIMEOUT", "failed")
    assert took < MAX_ATTEMPTS * 0.5 + MAX_BACKOFF_TOTAL + 4
    assert len(audit_vendor(db, big_vendor).unowned) == MAX_ATTEMPTS  # the reconciler's job
