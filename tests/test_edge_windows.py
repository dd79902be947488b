"""Windows of the start and stop paths that only a step-by-step test opens wide: a stop
between the claim and the vendor call, a full pool while recording a start, a lost commit
reply during a long outage, stops and their leases, admission without scanning history."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from orchestrator import store
from orchestrator.config import Settings
from orchestrator.contract import StartRequest
from orchestrator.db import Database, SessionRow
from orchestrator.deepbrain import DeepBrainClient
from orchestrator.lifecycle import (
    DispatchAfterCommit,
    Lifecycle,
    RetryLater,
    handle_start_message,
    reconcile,
    request_stop,
)
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.lifecycle.start import start_claimed
from orchestrator.simulator import SimulatorServer
from tests.conftest import APP_ID, USER_KEY, wait_until
from tests.helpers import insert_live_row, outbox_bodies, row, row_or_none
from tests.test_edge_cases import RecordingDispatcher
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
    dispatcher = RecordingDispatcher()
    lc = Lifecycle(
        settings=settings,
        db=Database(
            database_url,
            pool_size=1,
            max_overflow=0,
            pool_timeout=30.0,
            hooks=DispatchAfterCommit(dispatcher),
        ),
        vendor=DeepBrainClient(simulator.base_url, APP_ID, USER_KEY, timeout_seconds=5),
        dispatcher=dispatcher,
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
    return [lc.vendors.client("default").start_session(body).session_id for _ in range(count)]


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


# -- the admission lock: a lease that starts after it, a bounded wait ------------------------


def hold_admission_lock(db: Database, seconds: float) -> Future[datetime]:
    """Another claim (or a slow admission) holds the lock for ``seconds``; returns once it is
    held. The future gives when it was released, by the database's clock."""
    held = threading.Event()

    def hold() -> datetime:
        with db.engine.connect() as connection, connection.begin():
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:k)"), {"k": store.ADMISSION_LOCK_KEY}
            )
            held.set()
            time.sleep(seconds)
            released: datetime = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
        return released

    future = in_background(hold)
    assert held.wait(10)
    return future


def test_the_attempt_lease_runs_from_when_the_admission_lock_was_granted(
    lifecycle: Lifecycle,
) -> None:
    """A claim that waited for the lock does not start its lease (or its row's clock) before
    the wait: a lease stamped at the statement's start would lose the wait from its margin."""
    holder = hold_admission_lock(lifecycle.db, 2.0)
    claimed = claim(lifecycle, "late")
    released = holder.result(timeout=10)
    assert claimed.ticket is not None
    r = row(lifecycle.db, "late")
    assert r.attempt_lease_until is not None
    lease = timedelta(seconds=lifecycle.settings.start_timeout_seconds)
    assert r.attempt_lease_until >= released + lease - timedelta(seconds=0.2)
    assert r.created_at >= released - timedelta(seconds=0.2)


def test_a_claim_that_cannot_get_the_admission_lock_in_time_is_retried_not_failed(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    bound = store.admission.ADMISSION_LOCK_WAIT_SECONDS
    holder = hold_admission_lock(lifecycle.db, bound + 2.0)
    body = {"avatar_id": "a", "request_id": "busy"}
    began = time.monotonic()
    with pytest.raises(RetryLater):
        handle_start_message(lifecycle, (), body, claim_id="t-1")
    took = time.monotonic() - began
    holder.result(timeout=20)
    assert bound - 0.5 <= took < bound + 1.5, took
    assert row_or_none(lifecycle.db, "busy") is None
    assert handle_start_message(lifecycle, (), body, claim_id="t-1").status == "active"


# -- admission that does not scan history ----------------------------------------------------


def tuples_read(session: Any) -> int:
    """Rows of ``sessions`` this transaction has read so far (sequential and by index)."""
    found = session.execute(
        text(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
            " FROM pg_stat_xact_user_tables WHERE relname = 'sessions'"
        )
    ).scalar()
    return int(found or 0)


def test_admission_reads_the_vendor_limit_from_one_row_not_the_history_of_starts(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    simulator.configure(max_concurrent_sessions=3)  # reported as max_session_numbers
    assert (
        handle_start_message(
            lifecycle, (), {"avatar_id": "a", "request_id": "reported"}, claim_id="t-0"
        ).status
        == "active"
    )
    # Then 3,000 starts whose replies left the optional limit out, all ended since.
    long_ago = datetime.now(UTC) - timedelta(days=1)
    with lifecycle.db.transaction() as session:
        session.add_all(
            SessionRow(
                request_id=f"old-{i}",
                status="ended",
                avatar_id="a",
                request_payload={},
                payload_sha256="0" * 64,
                created_at=long_ago,
                started_at=long_ago + timedelta(seconds=i),
                ended_at=long_ago + timedelta(seconds=i + 1),
            )
            for i in range(3000)
        )
    with lifecycle.db.transaction() as session:
        session.execute(
            text(
                "UPDATE sessions SET started_at = now() - interval '2 days'"
                " WHERE request_id = 'reported'"
            )
        )
    with lifecycle.db.transaction() as session:
        before = tuples_read(session)
        state = store.admission._admission_state(session, 10)
        read = tuples_read(session) - before
    assert state.cap == 3  # the vendor's last reported limit still holds
    assert read < 20, f"admission read {read} rows of sessions under its lock"
