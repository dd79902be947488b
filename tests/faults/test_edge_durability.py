"""Durable before ack: what a start message's acknowledgement relies on survives a crash of
Postgres (SIGKILL of the server, then crash recovery), and a lost commit reply is not taken
for a failed write."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.db.migrate import upgrade
from orchestrator.lifecycle import Lifecycle, RetryLater, handle_start_message
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.conftest import WorkerProcess, wait_until
from tests.faults.conftest import FAULT_ACCOUNTS, via_proxy
from tests.faults.crashable_postgres import CrashablePostgres
from tests.faults.tcp_proxy import TcpProxy
from tests.helpers import event_kinds, row, row_or_none
from tests.threads import in_background

PATIENT_VENDOR_SECONDS = 20.0
SLOW_REPLY = 10.0  # inside PATIENT_VENDOR_SECONDS, longer than a crash and restart under load

pytestmark = [pytest.mark.postgres, pytest.mark.faults]


@pytest.fixture
def crashable() -> Iterator[CrashablePostgres]:
    with CrashablePostgres() as server:
        upgrade(server.url)
        yield server


@pytest.fixture
def crash_lifecycle(
    crashable: CrashablePostgres, settings_for: Callable[..., Settings], simulator: SimulatorServer
) -> Iterator[Lifecycle]:
    lc = inline_lifecycle(settings_for(database_url=crashable.url, max_concurrent_sessions=1))
    yield lc
    lc.close()


@pytest.fixture
def patient_crash_lifecycle(
    crashable: CrashablePostgres, settings_for: Callable[..., Settings], simulator: SimulatorServer
) -> Iterator[Lifecycle]:
    """A vendor timeout long enough for a slow reply to outlast a crash and restart of
    Postgres on a loaded machine (with the tests' 5 s a 4 s reply had to beat the restart)."""
    settings = settings_for(
        database_url=crashable.url,
        max_concurrent_sessions=1,
        vendor_timeout_seconds=PATIENT_VENDOR_SECONDS,
        start_timeout_seconds=3 * PATIENT_VENDOR_SECONDS,
        orphan_grace_seconds=4 * PATIENT_VENDOR_SECONDS,
    )
    lc = inline_lifecycle(settings)
    yield lc
    lc.close()


def start(lc: Lifecycle, claim_id: str, request_id: str) -> Any:
    return handle_start_message(
        lc, (), {"avatar_id": "a", "request_id": request_id}, claim_id=claim_id
    )


def test_a_waiting_request_survives_a_crash_right_after_its_ack(
    crashable: CrashablePostgres, crash_lifecycle: Lifecycle
) -> None:
    lc = crash_lifecycle
    for i in range(FAULT_ACCOUNTS):  # every account's one slot taken
        assert start(lc, f"t-1-{i}", f"first-{i}").status == "active"
    assert start(lc, "t-2", "second").status == "waiting"
    # The task acks here. Postgres dies before its WAL writer would have flushed the claim.
    crashable.crash()
    crashable.restart()
    lc.db.engine.dispose()

    r = row_or_none(lc.db, "second")
    assert r is not None and r.status == "waiting"


def test_a_start_whose_row_was_lost_in_a_crash_is_claimed_again_not_dropped(
    crashable: CrashablePostgres, crash_lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    lc = crash_lifecycle
    simulator.configure(endpoint_latency="start=1.5")
    first_delivery = in_background(lambda: start(lc, "t-1", "lost"))
    wait_until(lambda: simulator.stats()["endpoints"]["start"]["calls"] > 0, 5, 0.01)
    crashable.crash()  # the claim had not reached the disk
    crashable.restart()
    # Another thread of the worker met the dead connection first and SQLAlchemy renewed the
    # pool, so the start's record runs on a fresh connection and finds no row at all.
    lc.db.engine.dispose()

    with pytest.raises(RetryLater):  # not acknowledged: the message is sent again
        first_delivery.result(timeout=30)
    assert start(lc, "t-1", "lost").status == "active"  # the redelivery
    sessions = simulator.sessions()
    assert len(sessions) == 2
    assert sorted(s["status"] for s in sessions) == ["active", "ended"]
    assert [s["end_reason"] for s in sessions if s["status"] == "ended"] == ["ERROR"]


@pytest.mark.parametrize("status", [400, 409], ids=["refused", "at-its-limit"])
def test_a_refused_start_whose_row_was_lost_in_a_crash_is_claimed_again_not_acked(
    crashable: CrashablePostgres,
    patient_crash_lifecycle: Lifecycle,
    simulator: SimulatorServer,
    status: int,
) -> None:
    """Every outcome of the vendor call, not only its yes: a refusal (recorded as ``failed``)
    and "the account is at its limit" (back to ``waiting``) find no row after the crash."""
    lc = patient_crash_lifecycle
    # Long enough for the crash, the restart and the pool's renewal to happen inside the call,
    # also on a loaded machine (4 s was not, once: the reply found the dead pool).
    simulator.push_fault({"endpoint": "start", "status": status, "delay_seconds": SLOW_REPLY})
    first_delivery = in_background(lambda: start(lc, "t-1", "refused"))
    wait_until(lambda: simulator.stats()["endpoints"]["start"]["calls"] > 0, 5, 0.01)
    crashable.crash()  # the claim had not reached the disk
    crashable.restart()
    lc.db.engine.dispose()

    with pytest.raises(RetryLater):  # not acknowledged: the message is sent again
        first_delivery.result(timeout=30)
    assert row_or_none(lc.db, "refused") is None
    assert start(lc, "t-1", "refused").status == "active"  # the redelivery, no fault left
    assert [s["status"] for s in simulator.sessions()] == ["active"]


# -- 12. a lost commit reply -----------------------------------------------------------------


def test_a_lost_commit_reply_is_not_taken_for_a_failed_write(
    settings_for: Callable[..., Settings],
    database_url: str,
    db: Database,
    pg_proxy: TcpProxy,
    simulator: SimulatorServer,
) -> None:
    url = via_proxy(database_url, pg_proxy)
    lc = inline_lifecycle(settings_for(database_url=url))
    try:
        # The start's record is one statement (the CTE that begins "WITH marked AS"): the proxy
        # lets it reach the server, which commits it, then drops the connection unanswered.
        pg_proxy.drop_reply_to(b"WITH marked AS")
        assert (
            handle_start_message(
                lc, (), {"avatar_id": "a", "request_id": "r"}, claim_id="t-1"
            ).status
            == "active"
        )
    finally:
        lc.close()
    assert pg_proxy.replies_dropped == 1
    r = row(db, "r")
    assert r.status == "active"
    (vendor,) = simulator.sessions()
    assert vendor["status"] == "active" and vendor["stop_calls"] == 0
    assert "compensated" not in event_kinds(db, "r")


def test_a_lost_commit_reply_during_a_long_outage_ends_the_row_at_the_retry(
    settings_for: Callable[..., Settings],
    database_url: str,
    db: Database,
    pg_proxy: TcpProxy,
    simulator: SimulatorServer,
) -> None:
    """The record's commit lands, its reply is lost, and the database stays away past the
    record window: the worker stops the vendor session (it cannot tell) and carries its id to
    the message's retry, which finds the row holding it and ends the row — no row says
    ``active`` for a session that no longer runs, and no second session is started."""
    url = via_proxy(database_url, pg_proxy)
    lc = inline_lifecycle(
        settings_for(database_url=url, orphan_grace_seconds=8.0, vendor_timeout_seconds=5.0)
    )
    body = {"avatar_id": "a", "request_id": "r"}
    try:
        pg_proxy.drop_reply_to(b"WITH marked AS", reset_after=5.0)
        first = in_background(lambda: handle_start_message(lc, (), body, claim_id="t-1"))
        wait_until(lambda: pg_proxy.replies_dropped == 1, 10, 0.005)
        pg_proxy.cut()  # the database is away for longer than the record window (3 s)
        with pytest.raises(RetryLater) as retry:
            first.result(timeout=30)
        pg_proxy.restore()
        assert row(db, "r").status == "active"  # the commit had landed
        (vendor,) = simulator.sessions()
        assert (vendor["status"], vendor["end_reason"]) == ("ended", "ERROR")

        later = retry.value  # the retry, as the start task publishes it
        outcome = handle_start_message(
            lc,
            (),
            body,
            claim_id="t-1",
            abandoned_attempt=later.abandoned_attempt,
            stopped_vendor_session=later.stopped_vendor_session,
        )
    finally:
        lc.close()
    assert outcome.status == "ended"
    r = row(db, "r")
    assert (r.status, r.end_reason, r.vendor_session_id) == ("ended", "ERROR", vendor["session_id"])
    assert len(simulator.sessions()) == 1


@pytest.mark.broker
@pytest.mark.worker
def test_a_worker_ends_the_row_of_a_session_it_stopped_after_a_lost_commit_reply(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    database_url: str,
    db: Database,
    big_vendor: SimulatorServer,
    pg_proxy: TcpProxy,
    clean_queues: None,
) -> None:
    """As above, through a worker: the stopped session's id travels in the retry's headers,
    across the retries the outage itself causes, until the database is back."""
    settings = fault_settings(
        database_url=via_proxy(database_url, pg_proxy),
        orphan_grace_seconds=8.0,
        vendor_timeout_seconds=5.0,
        start_timeout_seconds=20.0,
        stop_retry_seconds=10.0,
    )
    worker = start_worker(settings)
    producer = Producer(settings)
    try:
        pg_proxy.drop_reply_to(b"WITH marked AS", reset_after=5.0)
        producer.enqueue_start_session(request_id="r", avatar_id="a")
        wait_until(lambda: pg_proxy.replies_dropped == 1, 20, 0.005)
        pg_proxy.cut()  # away past the record window (3 s) and through a few retries
        wait_until(lambda: big_vendor.sessions(status="ended"), 20, 0.1, "the compensation")
        wait_until(lambda: "database unavailable" in worker.log(), 30, 0.2, "a retry in the outage")
        pg_proxy.restore()
        r = wait_until(
            lambda: (found := row(db, "r")).status == "ended" and found, 30, 0.2, "row ended"
        )
    finally:
        producer.close()
    assert (r.status, r.end_reason) == ("ended", "ERROR")
    (vendor,) = big_vendor.sessions()
    assert r.vendor_session_id == vendor["session_id"]
