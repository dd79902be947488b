"""Admission control on real Postgres: the cap holds, waiting requests start in arrival order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text, update

from orchestrator import store
from orchestrator.config import Settings
from orchestrator.db import Database, SessionEvent, SessionRow
from orchestrator.lifecycle import (
    Lifecycle,
    admit_waiting,
    handle_start_message,
    request_stop,
)
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from orchestrator.store import admission_state
from tests.conftest import WorkerProcess, wait_until
from tests.helpers import event_kinds, row, rows
from tests.threads import in_background, race

pytestmark = pytest.mark.postgres


@pytest.fixture
def capped(settings_for: Callable[..., Settings], db: Database) -> Iterator[Lifecycle]:
    lc = inline_lifecycle(settings_for(max_concurrent_sessions=2))
    yield lc
    lc.close()


def start(lc: Lifecycle, request_id: str, **kwargs: object) -> str:
    return handle_start_message(
        lc, (), {"avatar_id": "a", "request_id": request_id, **kwargs}, claim_id=f"t-{request_id}"
    ).status


def test_requests_over_the_cap_wait_and_start_in_order_as_slots_free(
    capped: Lifecycle, simulator: SimulatorServer
) -> None:
    statuses = [start(capped, f"r-{i}") for i in range(5)]
    assert statuses == ["active", "active", "waiting", "waiting", "waiting"]
    assert len(simulator.sessions()) == 2

    request_stop(capped, request_id="r-0")  # frees a slot: the oldest waiting one starts at once
    assert [row(capped.db, f"r-{i}").status for i in range(5)] == [
        "ended",
        "active",
        "active",
        "waiting",
        "waiting",
    ]
    request_stop(capped, request_id="r-3")  # a waiting request ends without a vendor call
    assert (row(capped.db, "r-3").status, row(capped.db, "r-3").end_reason) == (
        "ended",
        "USER_CLOSED",
    )
    assert len(simulator.sessions()) == 3
    request_stop(capped, request_id="r-1")
    assert row(capped.db, "r-4").status == "active"
    assert "admitted" in event_kinds(capped.db, "r-4")


def test_vendor_limit_lower_than_ours_wins(
    settings_for: Callable[..., Settings], db: Database, simulator: SimulatorServer
) -> None:
    simulator.configure(max_concurrent_sessions=1)
    lc = inline_lifecycle(settings_for(max_concurrent_sessions=5))
    try:
        assert start(lc, "first") == "active"  # the vendor reports max_session_numbers = 1
        assert admission_state(lc.db, 5).cap == 1
        assert start(lc, "second") == "waiting"
    finally:
        lc.close()


def test_waiting_past_its_deadline_fails_with_capacity_timeout(
    capped: Lifecycle, simulator: SimulatorServer
) -> None:
    start(capped, "a")
    start(capped, "b")
    assert start(capped, "late", start_deadline_seconds=1) == "waiting"
    with capped.db.transaction() as session:
        session.execute(
            update(SessionRow)
            .where(SessionRow.request_id == "late")
            .values(start_deadline_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert admit_waiting(capped).expired == 1
    late = row(capped.db, "late")
    assert (late.status, late.error_code) == ("failed", "CAPACITY_TIMEOUT")
    assert len(simulator.sessions()) == 2


def test_vendor_at_its_limit_puts_the_request_back_to_waiting(
    capped: Lifecycle, simulator: SimulatorServer
) -> None:
    simulator.push_fault({"endpoint": "start", "status": 403, "code": 4030, "message": "limit"})
    assert start(capped, "bounced") == "waiting"
    r = row(capped.db, "bounced")
    assert (r.status, r.attempts, r.error_code) == ("waiting", 1, None)
    assert admit_waiting(capped).admitted == 1
    assert row(capped.db, "bounced").status == "active"


def test_concurrent_claims_never_exceed_the_cap(
    capped: Lifecycle, simulator: SimulatorServer
) -> None:
    simulator.configure(endpoint_latency="start=0.2")
    outcomes = race(*[lambda i=i: start(capped, f"c-{i}") for i in range(10)])
    # Every claim ran to its end: two started, the other eight wait for a slot.
    assert sorted(outcomes) == ["active"] * 2 + ["waiting"] * 8
    assert simulator.stats()["sessions"]["max_active"] <= 2
    assert sorted(r.status for r in rows(capped.db)) == ["active"] * 2 + ["waiting"] * 8


def test_a_claim_that_waited_for_the_admission_lock_counts_what_the_holder_committed(
    capped: Lifecycle,
) -> None:
    """``orchestrator_claim`` takes the lock, then counts: a claim queued behind another
    decision must see that decision's rows (a statement snapshot taken before the lock was
    granted would not, and would hand out a slot twice)."""
    holder = capped.db.engine.connect()
    holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": store.ADMISSION_LOCK_KEY})
    for i in range(2):  # fill the cap of 2 while the lock is held
        holder.execute(
            text(
                "INSERT INTO sessions (id, request_id, status, request_payload, payload_sha256,"
                " created_at, attempts, stop_attempts)"
                " VALUES (gen_random_uuid(), :r, 'starting', '{}', 'x', now(), 1, 0)"
            ),
            {"r": f"held-{i}"},
        )
    claimer = in_background(lambda: start(capped, "queued"))

    def claim_is_waiting_for_the_lock() -> bool:
        with capped.db.engine.connect() as conn:
            waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            return bool(conn.execute(text(waiting)).scalar_one() == 1)

    wait_until(claim_is_waiting_for_the_lock, timeout=10)
    assert not claimer.done()  # the claim waits for the lock
    holder.commit()
    holder.close()
    assert claimer.result(timeout=10) == "waiting"
    assert row(capped.db, "queued").attempts == 0


@pytest.mark.broker
@pytest.mark.worker
def test_cap_holds_across_two_workers_and_everything_ends(
    settings_for: Callable[..., Settings],
    broker_url: str,
    db: Database,
    simulator: SimulatorServer,
    start_worker: Callable[..., WorkerProcess],
    purge_queues: Callable[[], None],
) -> None:
    cap, count = 3, 12
    purge_queues()
    settings = settings_for(
        broker_url=broker_url,
        max_concurrent_sessions=cap,
        reaper_interval_seconds=0.3,
        orphan_grace_seconds=5.0,  # a worker refuses a grace shorter than the vendor timeout
    )
    simulator.configure(endpoint_latency="start=0.05")
    start_worker(settings, "--beat")
    start_worker(settings, "--hostname", "second@%h")
    producer = Producer(settings)
    try:
        ids = [
            producer.enqueue_start_session(
                avatar_id="a", request_id=f"q-{i:02d}", max_duration_seconds=1
            )
            for i in range(count)
        ]
        peak = 0

        def all_done() -> bool:
            nonlocal peak
            with db.transaction() as session:
                live = session.scalar(
                    select(func.count()).where(
                        SessionRow.status.in_(["starting", "active", "stopping"])
                    )
                )
                done = session.scalar(
                    select(func.count()).where(SessionRow.status.in_(["ended", "failed"]))
                )
            peak = max(peak, live or 0)
            return done == count

        wait_until(all_done, timeout=60, interval=0.02)
    finally:
        producer.close()
    assert 0 < peak <= cap
    assert simulator.stats()["sessions"]["max_active"] <= cap
    final = {r.request_id: r for r in rows(db)}
    assert all(final[i].status == "ended" for i in ids), {i: final[i].status for i in ids}
    assert all(final[i].end_reason == "MAX_DURATION_REACHED" for i in ids)
    # First in, first out: requests that waited were admitted in the order they arrived.
    with db.transaction() as session:
        admitted_order = list(
            session.scalars(
                select(SessionRow.request_id)
                .join(SessionEvent, SessionEvent.session_id == SessionRow.id)
                .where(SessionEvent.kind == "admitted")
                .order_by(SessionEvent.id)
            )
        )
    arrival_order = [r.request_id for r in sorted(final.values(), key=lambda r: r.created_at)]
    assert len(admitted_order) >= count - cap
    assert admitted_order == [i for i in arrival_order if i in admitted_order]
