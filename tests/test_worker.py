"""End to end: real RabbitMQ, real Postgres, a real worker process (beat inside), the simulator.

Start jobs are published the way a non-Python producer would: with plain kombu, exactly the
message docs/messages.md shows.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from kombu import Connection, Queue

from orchestrator.config import Settings, load_settings
from orchestrator.db import Database
from orchestrator.messaging import Topology, events_exchange
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.amqp import publish_raw
from tests.conftest import APP_ID, USER_KEY, WorkerProcess, wait_until
from tests.helpers import row, row_or_none, rows

pytestmark = [pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

REAPER_INTERVAL_SECONDS = 0.5
# The reaper's bound is one interval past expires_at; this margin covers what follows the
# sweep's decision on a loaded 2-core machine: the beat's message through RabbitMQ, a free
# worker thread, one vendor stop and two short transactions (together ~0.1 s when idle).
REAPER_MARGIN_SECONDS = 1.5


@pytest.fixture(scope="module")
def e2e_settings(
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
    broker_url: str,
    simulator_server: SimulatorServer,
) -> Settings:
    return load_settings(
        state_dir=tmp_path_factory.mktemp("e2e"),
        database_url=database_url,
        broker_url=broker_url,
        deepbrain_base_url=simulator_server.base_url,
        deepbrain_app_id=APP_ID,
        deepbrain_user_key=USER_KEY,
        reaper_interval_seconds=REAPER_INTERVAL_SECONDS,
        reconcile_interval_seconds=3600,
        vendor_timeout_seconds=5,
    )


@pytest.fixture(scope="module")
def worker(e2e_settings: Settings) -> Iterator[WorkerProcess]:
    process = WorkerProcess(e2e_settings, e2e_settings.state_dir / "worker.log", "--beat")
    yield process
    process.stop()


@pytest.fixture
def running(
    worker: WorkerProcess,
    db: Database,
    simulator: SimulatorServer,
    purge_queues: Callable[[], None],
) -> WorkerProcess:
    purge_queues()
    assert worker.process.poll() is None, worker.log()
    return worker


def dead_letters(broker_url: str) -> list[Any]:
    """Take every message now in ``orchestrator.dead``."""
    found = []
    with Connection(broker_url) as conn:
        queue = Topology().dead_letter_queue(conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            found.append(message)
    return found


def test_raw_message_becomes_active_then_the_reaper_ends_it_within_one_interval(
    running: WorkerProcess,
    e2e_settings: Settings,
    broker_url: str,
    db: Database,
    simulator: SimulatorServer,
) -> None:
    publish_raw(
        broker_url, {"request_id": "raw-1", "avatar_id": "avatar-raw", "max_duration_seconds": 2}
    )

    active = wait_until(lambda: (r := row_or_none(db, "raw-1")) and r.status == "active" and r)
    assert active.livekit_url and active.livekit_room and active.livekit_token
    assert active.livekit_token_expires_at and active.expires_at

    ended = wait_until(
        lambda: (r := row_or_none(db, "raw-1")) and r.status == "ended" and r, timeout=15
    )
    assert ended.end_reason == "MAX_DURATION_REACHED"
    assert ended.livekit_token is None
    (vendor,) = simulator.sessions()
    assert (vendor["status"], vendor["end_reason"], vendor["ended_by"]) == (
        "ended",
        "MAX_DURATION_REACHED",
        "stop",  # our stop call, not the vendor's own limit (a whole minute here)
    )
    # Not before expires_at, and within one reaper interval (+ margin) after it: for the row,
    # and for the vendor session, whose end is what the customer pays until.
    bound = REAPER_INTERVAL_SECONDS + REAPER_MARGIN_SECONDS
    expires_at = ended.expires_at.timestamp()
    vendor_lag = datetime.fromisoformat(vendor["ended_at"]).timestamp() - expires_at
    row_lag = ended.ended_at.timestamp() - expires_at
    print(f"\nreaper lag past expires_at: vendor {vendor_lag:.3f} s, row {row_lag:.3f} s")
    assert 0 <= vendor_lag <= row_lag <= bound, (vendor_lag, row_lag, bound)


def test_same_request_id_twice_makes_one_vendor_session(
    running: WorkerProcess, broker_url: str, db: Database, simulator: SimulatorServer
) -> None:
    for _ in range(2):
        publish_raw(broker_url, {"request_id": "twice", "avatar_id": "a"})
    publish_raw(broker_url, {"request_id": "marker", "avatar_id": "a"})
    wait_until(lambda: (r := row_or_none(db, "marker")) and r.status == "active")
    wait_until(lambda: (r := row_or_none(db, "twice")) and r.status == "active")
    assert len([r for r in rows(db) if r.request_id == "twice"]) == 1
    assert len(simulator.sessions()) == 2  # "twice" once, "marker" once


def test_bad_messages_fail_or_dead_letter_and_the_worker_keeps_going(
    running: WorkerProcess, broker_url: str, db: Database, simulator: SimulatorServer
) -> None:
    dead_letters(broker_url)  # start from an empty dead-letter queue
    publish_raw(broker_url, {"request_id": "no-avatar"})
    publish_raw(broker_url, None, body=b'[[], {"avatar_id": ')  # not JSON
    publish_raw(broker_url, None, body=b"\xff\xfe not utf-8")
    publish_raw(
        broker_url,
        None,
        body=pickle.dumps([[], {"avatar_id": "p"}, {}]),
        content_type="application/x-python-serialize",
    )
    publish_raw(broker_url, {"avatar_id": "a"}, task="orchestrator.no_such_task")
    publish_raw(broker_url, {"request_id": "good-after", "avatar_id": "a"})

    good = wait_until(lambda: (r := row_or_none(db, "good-after")) and r.status == "active" and r)
    assert good.vendor_session_id
    failed = wait_until(lambda: row_or_none(db, "no-avatar"))
    assert (failed.status, failed.error_code) == ("failed", "VALIDATION_ERROR")
    assert "'avatar_id' is required" in failed.error_message

    dead = wait_until(lambda: dead_letters_acc(broker_url, 4), timeout=10)
    assert (
        sorted(m.headers["task"] for m in dead)
        == ["orchestrator.no_such_task"] + ["orchestrator.start_session"] * 3
    )
    assert running.process.poll() is None
    assert len(simulator.sessions()) == 1


_dead_seen: list[Any] = []


def dead_letters_acc(broker_url: str, expected: int) -> list[Any] | None:
    _dead_seen.extend(dead_letters(broker_url))
    return list(_dead_seen) if len(_dead_seen) >= expected else None


def test_python_producer_enqueue_wait_and_stop(
    running: WorkerProcess, e2e_settings: Settings, db: Database, simulator: SimulatorServer
) -> None:
    producer = Producer(e2e_settings)
    try:
        request_id = producer.enqueue_start_session(avatar_id="avatar-p", max_session_duration=5)
        info = producer.wait_for_session(request_id, timeout=20)
        assert info.status == "active"
        assert info.livekit_url and info.livekit_room and info.livekit_token and info.expires_at
        assert info.livekit_token not in repr(info)
        producer.request_stop(request_id=request_id)
        wait_until(lambda: producer.session_info(request_id).status == "ended")
        assert producer.session_info(request_id).end_reason == "USER_CLOSED"
        (vendor,) = simulator.sessions()
        assert vendor["end_reason"] == "USER_CLOSED"
    finally:
        producer.close()


def test_worker_heartbeat_answers_the_health_command(
    running: WorkerProcess, e2e_settings: Settings
) -> None:
    from click.testing import CliRunner

    from orchestrator.cli import main
    from tests.conftest import settings_env

    result = CliRunner().invoke(main, ["health", "worker"], env=settings_env(e2e_settings))
    assert result.exit_code == 0, result.output
    assert "worker ok" in result.output


def test_lifecycle_events_reach_a_consumer_once_each_in_order(
    running: WorkerProcess, broker_url: str, db: Database, simulator: SimulatorServer
) -> None:
    events_queue = Queue(
        f"test-events-{uuid.uuid4().hex[:6]}", exchange=events_exchange, routing_key="session.#"
    )
    with Connection(broker_url) as conn:
        events_queue(conn.default_channel).declare()
        publish_raw(broker_url, {"request_id": "ev-1", "avatar_id": "a", "max_duration_seconds": 1})
        publish_raw(broker_url, {"request_id": "ev-bad"})  # invalid: session.failed
        wait_until(lambda: (r := row_or_none(db, "ev-1")) and r.status == "ended")
        wait_until(lambda: row_or_none(db, "ev-bad"))

        def received() -> list[Any] | None:
            found = []
            queue = events_queue(conn.default_channel)
            while (message := queue.get(no_ack=True)) is not None:
                found.append(message)
            _events_seen.extend(found)
            return _events_seen if len(_events_seen) >= 3 else None

        messages = wait_until(received, timeout=15)
        time.sleep(1.0)  # anything extra (a duplicate) would arrive by now
        received()
        events_queue(conn.default_channel).delete()

    bodies = [json.loads(m.body) for m in _events_seen]
    mine = [b for b in bodies if b["request_id"] == "ev-1"]
    assert [b["status"] for b in mine] == ["active", "ended"]
    assert [
        m.delivery_info["routing_key"]
        for m in messages
        if json.loads(m.body)["request_id"] == "ev-1"
    ] == [
        "session.active",
        "session.ended",
    ]
    active, ended = mine
    assert active["token"] and active["url"] and active["room_name"] and active["expires_at"]
    assert ended["end_reason"] == "MAX_DURATION_REACHED" and "token" not in ended
    assert active["session_id"] == ended["session_id"] == row(db, "ev-1").vendor_session_id
    # Once each: no event twice; ours are these three (a session of an earlier test of this
    # module's worker may end meanwhile and publish its own event: CI run of 2026-12-06).
    seen = [(b["request_id"], b["status"]) for b in bodies]
    assert len({b["event_id"] for b in bodies}) == len(bodies), seen
    ours = [b for b in bodies if b["request_id"] in ("ev-1", "ev-bad")]
    assert len(ours) == 3, seen
    assert all(b["version"] == 1 for b in bodies)
    (failed,) = [b for b in bodies if b["request_id"] == "ev-bad"]
    assert failed["status"] == "failed" and failed["error_code"] == "VALIDATION_ERROR"
    assert "'avatar_id' is required" in failed["error_message"]


_events_seen: list[Any] = []
