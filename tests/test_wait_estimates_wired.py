"""The expected wait, wired (docs/admission.md "The expected wait", migration 0011) on real
Postgres and RabbitMQ: beat's pass gives every waiting request its position and p50/p90, the
first estimate goes out as a ``session.waiting`` event through the outbox and the broker, a
later one only when it moved enough (at most once per 30 s per request), and status and the
producer show it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime

import pytest
from click.testing import CliRunner
from kombu import Connection, Queue
from sqlalchemy import text

from orchestrator import store
from orchestrator.cli import main
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.lifecycle import Lifecycle, estimate_waits_pass
from orchestrator.messaging import ADMIT_TASK, events_exchange
from orchestrator.producer import Producer
from orchestrator.store.ending import end
from orchestrator.store.rows import S
from orchestrator.store.tenants import set_policy
from orchestrator.tenants import TenantPolicy
from orchestrator.webhooks.payload import payload_for
from orchestrator.worker.celery_app import celery_config, create_app
from orchestrator.worker.tasks import ESTIMATE_WAITS_HEADER
from tests.conftest import settings_env
from tests.helpers import claim_request

pytestmark = pytest.mark.postgres

CAPS = {"a": 3, "b": 4}


@pytest.fixture
def pool(db: Database, lifecycle: Lifecycle) -> Database:
    """Two accounts of caps 3 and 4 admit; every other account is out of the catalog. The
    test's own writes go through ``db``, which dispatches nothing after a commit (no vendor
    start of an admitted request)."""
    store.sync_catalog(db, [store.CatalogEntry(n, cap, 1.0, {}) for n, cap in CAPS.items()])
    with db.transaction() as session:
        session.execute(text("UPDATE vendor_accounts SET in_catalog = (name IN ('a', 'b'))"))
    return db


def fill(db: Database, waiting: int, tenants: tuple[str, ...] = ("default",)) -> list[str]:
    """Every slot taken, then ``waiting`` requests waiting, spread over ``tenants``."""
    for i in range(sum(CAPS.values())):
        assert claim_request(db, f"live-{i}").status == "starting"
    waiters = []
    for i in range(waiting):
        rid = f"w-{i:03d}"
        assert claim_request(db, rid, tenant=tenants[i % len(tenants)]).status == "waiting"
        waiters.append(rid)
    return waiters


def waiting_events(db: Database) -> list[dict[str, object]]:
    with db.transaction() as session:
        found = session.execute(
            text("SELECT routing_key, body FROM event_outbox ORDER BY id")
        ).all()
    bodies = [body for key, body in found if key == "session.waiting"]
    assert all(b["status"] == "waiting" for b in bodies)
    return bodies


def free_slots(db: Database, n: int) -> None:
    """End ``n`` live sessions and admit as many waiting requests."""
    with db.transaction() as session:
        ids = list(
            session.scalars(
                text(
                    "SELECT id FROM sessions WHERE status = 'starting'"
                    " ORDER BY created_at LIMIT :n FOR UPDATE"
                ),
                {"n": n},
            )
        )
        end(session, ids, S.ENDED, from_statuses=[S.STARTING])
    for account in CAPS:
        store.admit(db, account=account)


def age_the_last_quotes(db: Database, seconds: float) -> None:
    """As if every last event had been sent ``seconds`` earlier (what it promised unchanged)."""
    with db.transaction() as session:
        session.execute(
            text("UPDATE wait_estimates SET sent_at = sent_at - make_interval(secs => :s)"),
            {"s": seconds},
        )


def test_a_waiting_request_gets_a_session_waiting_event_with_its_position_and_wait(
    pool: Database, lifecycle: Lifecycle
) -> None:
    waiters = fill(pool, 3)
    report = estimate_waits_pass(lifecycle)
    assert (report.estimated, report.sent, report.left_out) == (3, 3, 0)
    bodies = waiting_events(pool)
    assert [(b["request_id"], b["position"]) for b in bodies] == [
        (rid, i + 1) for i, rid in enumerate(waiters)
    ]
    for body in bodies:
        p50, p90 = body["wait_p50_seconds"], body["wait_p90_seconds"]
        assert isinstance(p50, float) and isinstance(p90, float) and 0 <= p50 <= p90
        assert datetime.fromisoformat(str(body["estimated_at"])).tzinfo is not None
        assert body["session_id"] is None and body["version"] == 1
        # A webhook endpoint that asks for session.waiting gets it in the usual shape.
        document = json.loads(payload_for("session.waiting", body, https=False))
        assert document["type"] == "session.waiting" and document["data"] == body
    # The second request waits no less than the first.
    assert bodies[0]["wait_p50_seconds"] <= bodies[1]["wait_p50_seconds"]  # type: ignore[operator]

    # A second pass at once: the estimates are kept fresh, nothing is sent again.
    report = estimate_waits_pass(lifecycle)
    assert (report.estimated, report.sent) == (3, 0)
    assert len(waiting_events(pool)) == 3


def test_resent_events_stay_bounded_with_many_waiters_and_freed_slots(
    pool: Database, lifecycle: Lifecycle
) -> None:
    """200 requests of four tenants wait; slots free between passes. Each request is told
    once at first; within 30 s of its last event it is told nothing more, however the pool
    moves; after that, an estimate that merely comes true is not sent again, and a request
    is told at most once per pass (counted from the outbox)."""
    set_policy(pool, TenantPolicy(name="gold", guaranteed=2))
    waiters = fill(pool, 200, ("default", "gold", "blue", "green"))
    first = estimate_waits_pass(lifecycle)
    assert (first.estimated, first.sent) == (200, 200)
    within_30_s = []
    for _ in range(4):
        free_slots(pool, 3)
        within_30_s.append(estimate_waits_pass(lifecycle).sent)
    assert within_30_s == [0, 0, 0, 0]
    age_the_last_quotes(pool, 31)
    free_slots(pool, 3)
    after_30_s = estimate_waits_pass(lifecycle)
    assert after_30_s.estimated == 185
    again = estimate_waits_pass(lifecycle)  # nothing moved since
    age_the_last_quotes(pool, 31)
    coming_true = estimate_waits_pass(lifecycle)  # nothing moved, 31 s after the last events
    assert (again.sent, coming_true.sent) == (0, 0)
    per_request: dict[str, int] = {}
    for body in waiting_events(pool):
        rid = str(body["request_id"])
        per_request[rid] = per_request.get(rid, 0) + 1
    assert set(per_request) == set(waiters)
    assert max(per_request.values()) <= 2  # the first, then at most one after 30 s
    assert sum(per_request.values()) == 200 + after_30_s.sent
    with pool.transaction() as session:
        sent_counts = dict(
            session.execute(
                text(
                    "SELECT s.request_id, e.sent_count FROM wait_estimates e"
                    " JOIN sessions s ON s.id = e.session_id"
                )
            ).all()
        )
    assert len(sent_counts) == 185
    assert all(sent_counts[rid] == per_request[rid] for rid in sent_counts)


def test_a_request_that_stopped_waiting_loses_its_estimate(
    pool: Database, lifecycle: Lifecycle
) -> None:
    waiters = fill(pool, 4)
    estimate_waits_pass(lifecycle)
    free_slots(pool, 2)
    report = estimate_waits_pass(lifecycle)
    assert report.estimated == 2
    with pool.transaction() as session:
        kept = session.execute(
            text(
                "SELECT s.request_id, e.position FROM wait_estimates e"
                " JOIN sessions s ON s.id = e.session_id ORDER BY e.position"
            )
        ).all()
    assert [tuple(r) for r in kept] == [(waiters[2], 1), (waiters[3], 2)]


def test_status_and_the_producer_show_the_position_and_wait(
    pool: Database, lifecycle: Lifecycle, settings_for: Callable[..., Settings]
) -> None:
    waiters = fill(pool, 2)
    settings = settings_for()
    run = CliRunner().invoke(main, ["status", waiters[1]], env=settings_env(settings))
    assert run.exit_code == 0, run.output
    assert "position" not in json.loads(run.output)  # no estimate yet
    estimate_waits_pass(lifecycle)
    run = CliRunner().invoke(main, ["status", waiters[1]], env=settings_env(settings))
    assert run.exit_code == 0, run.output
    shown = json.loads(run.output)
    assert shown["status"] == "waiting" and shown["position"] == 2
    assert 0 <= shown["wait_p50_seconds"] <= shown["wait_p90_seconds"]
    assert shown["estimated_at"].endswith("Z") or "+00:00" in shown["estimated_at"]

    producer = Producer(settings)
    try:
        info = producer.session_info(waiters[0])
        assert (info.status, info.position) == ("waiting", 1)
        assert info.wait_p50_seconds is not None and info.estimated_at is not None
        seen = []
        with pytest.raises(TimeoutError, match="position 1"):
            producer.wait_for_session(waiters[0], timeout=0.3, on_waiting=seen.append)
        assert [s.position for s in seen] == [1]
    finally:
        producer.close()


def test_the_admin_view_lists_waiting_requests_in_their_expected_order(
    pool: Database, lifecycle: Lifecycle
) -> None:
    waiters = fill(pool, 3)
    estimate_waits_pass(lifecycle)
    with pool.transaction() as session:
        found = session.execute(
            text(
                "SELECT request_id, position, p50_seconds, events_sent FROM admin_waiting_estimates"
            )
        ).all()
    assert [(r.request_id, r.position, r.events_sent) for r in found] == [
        (rid, i + 1, 1) for i, rid in enumerate(waiters)
    ]


@pytest.mark.broker
def test_beat_sends_the_estimate_pass_as_an_admission_pass_and_the_event_reaches_the_broker(
    pool: Database, settings_for: Callable[..., Settings], broker_url: str
) -> None:
    """Beat's entry is the admission task with the estimate header (a worker of the previous
    release runs it as a plain admission pass); the worker's task runs both, and the relay
    publishes the ``session.waiting`` event on ``orchestrator.events``."""
    settings = settings_for(
        broker_url=broker_url, wait_estimate_interval_seconds=7, max_concurrent_sessions=1
    )
    entry = celery_config(settings)["beat_schedule"]["estimate-waits"]
    assert entry["task"] == ADMIT_TASK and entry["schedule"] == 7
    assert entry["options"]["headers"] == {ESTIMATE_WAITS_HEADER: "1"}
    fill(pool, 5)
    app = create_app(settings)  # its catalog: the account default, of cap 1
    queue = Queue(
        f"test-waits-{uuid.uuid4().hex[:6]}", exchange=events_exchange, routing_key="session.#"
    )
    try:
        with Connection(broker_url) as conn:
            queue(conn.default_channel).declare()
            try:
                plain = app.tasks[ADMIT_TASK].apply().get()
                assert "estimated" not in plain and waiting_events(pool) == []
                done = app.tasks[ADMIT_TASK].apply(headers=entry["options"]["headers"]).get()
                with pool.transaction() as session:
                    waiters = list(
                        session.scalars(
                            text(
                                "SELECT request_id FROM sessions WHERE status = 'waiting'"
                                " ORDER BY created_at"
                            )
                        )
                    )
                assert len(waiters) == 4  # one went to default's slot
                assert (done["estimated"], done["sent"]) == (4, 4)
                app.dispatcher.relay.relay_now()
                received = []
                while (message := queue(conn.default_channel).get(no_ack=True)) is not None:
                    received.append(message)
            finally:
                queue(conn.default_channel).delete()
    finally:
        app.close()
    assert [
        (m.delivery_info["routing_key"], json.loads(m.body)["request_id"]) for m in received
    ] == [("session.waiting", rid) for rid in waiters]


def test_arrivals_beyond_twice_what_the_pool_serves_are_read_as_twice() -> None:
    """Each run simulates every arrival until the last waiter is admitted: in an overload its
    cost grew with the arrival rate times the longest wait (308 s of CPU for one pass over
    10,000 waiters at 17 requests/s on 100 one-hour slots; 3.9 s once capped)."""
    from orchestrator.lifecycle.waits import OVERLOAD, bounded_arrivals
    from orchestrator.tenants import Pool

    def pool(rates: dict[str, float]) -> Pool:
        return Pool(
            capacity=10,
            live=[],
            waiters=[],
            policies={},
            durations={"a": [600.0] * 5},
            now=0.0,
            max_duration=3600.0,
            arrival_rates=rates,
        )

    served = 10 / 600.0
    calm = pool({"a": served / 2, "b": served / 2})
    assert bounded_arrivals(calm) is calm
    flooded = bounded_arrivals(pool({"a": 10.0, "b": 30.0}))
    assert flooded.arrival_rates is not None
    assert sum(flooded.arrival_rates.values()) == pytest.approx(OVERLOAD * served)
    assert flooded.arrival_rates["b"] == pytest.approx(3 * flooded.arrival_rates["a"])
