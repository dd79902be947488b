"""Windows of the start and stop paths that only a step-by-step test opens wide: a stop
between the claim and the vendor call, a full pool while recording a start, a lost commit
reply during a long outage, stops and their leases, admission without scanning history."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.deepbrain import DeepBrainClient
from orchestrator.lifecycle import (
    Lifecycle,
    RetryLater,
    handle_start_message,
    reconcile,
    request_stop,
    store,
)
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.lifecycle.requests import StartRequest
from orchestrator.lifecycle.start import start_claimed
from orchestrator.simulator import SimulatorServer
from tests.conftest import APP_ID, USER_KEY, wait_until
from tests.helpers import outbox_bodies, row
from tests.test_edge_cases import RecordingDispatcher, insert_live_row
from tests.threads import in_background

pytestmark = pytest.mark.postgres


def claim(lc: Lifecycle, request_id: str) -> store.Claim:
    """The claim step of a start message, as the worker runs it."""
    payload: dict[str, Any] = {"avatar_id": "avatar-a", "request_id": request_id}
    return store.claim(
        lc.db,
        store.ClaimRequest(
            request_id=request_id,
            claim_id=f"task-{request_id}",
            payload=payload,
            digest=f"digest-{request_id}",
            avatar_id="avatar-a",
            metadata=None,
            max_duration_seconds=None,
            start_deadline_seconds=None,
            traceparent=None,
        ),
        max_concurrent_sessions=lc.settings.max_concurrent_sessions,
        lease_seconds=lc.settings.start_timeout_seconds,
    )


# -- a stop between the claim and the vendor call --------------------------------------------


def test_a_stop_between_the_claim_and_the_vendor_call_ends_the_row_without_a_call(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    claimed = claim(lifecycle, "between")
    assert claimed.ticket is not None  # admitted at once: the vendor call comes next
    stopped = request_stop(lifecycle, request_id="between", reason="USER_CLOSED")
    assert stopped.found and stopped.status_before == "starting"

    outcome = start_claimed(lifecycle, claimed.ticket)

    assert outcome.status == "ended"
    assert simulator.stats()["endpoints"]["start"]["calls"] == 0
    assert simulator.sessions() == []
    r = row(lifecycle.db, "between")
    assert (r.status, r.end_reason, r.vendor_session_id) == ("ended", "USER_CLOSED", None)
    assert [b["status"] for b in outbox_bodies(lifecycle.db, "between")] == ["ended"]


# -- a full pool while recording a start -----------------------------------------------------


def test_a_full_pool_while_recording_a_start_is_waited_out_no_longer_than_the_record_window(
    settings_for: Callable[..., Settings],
    database_url: str,
    db: Database,
    simulator: SimulatorServer,
) -> None:
    """The pool's own timeout (30 s) is longer than the record window (the orphan grace less
    the vendor timeout: 3 s here): each wait for a connection on the record path is cut to
    what is left of the window, so the session is stopped within it, not at twice the pool
    timeout, long after the reconciler could have met it as an orphan."""
    settings = settings_for(orphan_grace_seconds=8.0, vendor_timeout_seconds=5.0)
    window = settings.orphan_grace_seconds - settings.vendor_timeout_seconds
    simulator.configure(endpoint_latency="start=0.5")
    lc = Lifecycle(
        settings=settings,
        db=Database(database_url, pool_size=1, max_overflow=0, pool_timeout=30.0),
        vendor=DeepBrainClient(simulator.base_url, APP_ID, USER_KEY, timeout_seconds=5),
        dispatcher=RecordingDispatcher(),
    )
    try:
        started = in_background(
            lambda: handle_start_message(
                lc, (), {"avatar_id": "a", "request_id": "full"}, claim_id="t-1"
            )
        )
        wait_until(lambda: simulator.stats()["endpoints"]["start"]["calls"] > 0, 5, 0.01)
        # Another thread of the worker holds the only connection past the whole window.
        with lc.db.engine.connect():
            replied = time.monotonic() + 0.5
            with pytest.raises(RetryLater):
                started.result(timeout=window + 10)
            took = time.monotonic() - replied
    finally:
        lc.close()
    # The window, then the compensating stop and its audit entry's bounded wait (2 s).
    assert took <= window + 2.0 + 2.0, took
    (vendor,) = simulator.sessions()
    assert vendor["status"] == "ended" and vendor["end_reason"] == "ERROR"
    assert row(db, "full").status == "starting"  # the retry starts it again


# -- stops that overlap, probes that walk ----------------------------------------------------


def seconds_to_stop_retry(db: Database, request_id: str) -> float | None:
    with db.transaction() as session:
        found = session.execute(
            text(
                "SELECT extract(epoch FROM stop_retry_at - now()) FROM sessions"
                " WHERE request_id = :r AND status = 'stopping'"
            ),
            {"r": request_id},
        ).scalar()
    return None if found is None else float(found)


def test_a_stop_that_came_during_the_start_holds_the_whole_stop_lease(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    """The stop owed after a start's record runs for up to the stop's lease (55 s of 60 at
    defaults): the reaper may not take it again sooner, or two stops of one session overlap."""
    simulator.configure(endpoint_latency="start=1.0,stop=3.0")
    body = {"avatar_id": "a", "request_id": "r"}
    started = in_background(lambda: handle_start_message(lifecycle, (), body, claim_id="t-1"))
    wait_until(lambda: simulator.stats()["endpoints"]["start"]["calls"] > 0, 5, 0.01)
    request_stop(lifecycle, request_id="r")  # during the vendor call: the record owes it
    left = wait_until(lambda: seconds_to_stop_retry(lifecycle.db, "r"), 10, 0.02)
    assert started.result(timeout=30).status == "stopping"
    lease = lifecycle.settings.stop_retry_seconds
    assert lease - 3.0 <= left <= lease, left
    assert row(lifecycle.db, "r").status == "ended"


def start_vendor_sessions(lc: Lifecycle, count: int) -> list[str]:
    """Sessions the vendor runs for our key that no row knows."""
    body = StartRequest.model_validate({"avatar_id": "a"}).vendor_body()
    return [lc.vendor.start_session(body).session_id for _ in range(count)]


def test_a_404_on_stop_is_settled_by_one_detail_call_not_a_walk_of_the_list(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    start_vendor_sessions(lifecycle, 5)
    assert (
        handle_start_message(
            lifecycle, (), {"avatar_id": "a", "request_id": "r"}, claim_id="t-1"
        ).status
        == "active"
    )
    simulator.push_fault({"endpoint": "stop", "status": 404, "code": 4040})
    simulator.push_fault({"endpoint": "detail", "status": 404, "code": 4040})

    stopped = request_stop(lifecycle, request_id="r")

    assert stopped.vendor_stopped and row(lifecycle.db, "r").status == "ended"
    endpoints = simulator.stats()["endpoints"]
    assert (endpoints["list"]["calls"], endpoints["detail"]["calls"]) == (0, 1)


def test_a_404_on_stop_for_a_session_the_vendor_shows_running_is_not_taken_as_gone(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    assert (
        handle_start_message(
            lifecycle, (), {"avatar_id": "a", "request_id": "r"}, claim_id="t-1"
        ).status
        == "active"
    )
    simulator.push_fault({"endpoint": "stop", "status": 404, "code": 4040})

    stopped = request_stop(lifecycle, request_id="r")

    assert not stopped.vendor_stopped
    r = row(lifecycle.db, "r")
    assert (r.status, r.stop_attempts) == ("stopping", 1)  # the reaper tries again


def test_a_slow_detail_endpoint_leaves_the_orphan_sweep_its_share_of_the_pass(
    settings_for: Callable[..., Settings], db: Database, simulator: SimulatorServer
) -> None:
    lc = inline_lifecycle(
        settings_for(
            vendor_timeout_seconds=1.0, reconcile_interval_seconds=1.0, orphan_grace_seconds=0.5
        )
    )
    try:
        (orphan,) = start_vendor_sessions(lc, 1)
        for i in range(20):  # rows the vendor no longer lists: one detail call each
            insert_live_row(lc.db, f"r-{i}", f"not-listed-{i}")
        time.sleep(1.0)  # the orphan is past its grace
        simulator.configure(endpoint_latency="detail=0.8")
        report = reconcile(lc)  # a pass of 2 s: 20 detail calls would take 16
    finally:
        lc.close()
    assert report.out_of_time
    assert report.orphans_stopped == 1
    (vendor,) = [s for s in simulator.sessions() if s["session_id"] == orphan]
    assert (vendor["status"], vendor["end_reason"]) == ("ended", "ZOMBIE_SESSION_REAP")
