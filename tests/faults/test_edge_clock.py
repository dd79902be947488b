"""One clock: a worker whose wall clock is 10 s ahead (libfaketime, Debian's ``faketime``
package, shifts it for that one process) times sessions by the database's clock, and still
runs the sweeps beat sends from a host whose clock is right."""

from __future__ import annotations

import glob
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.conftest import WorkerProcess, settings_env, wait_until
from tests.faults.conftest import wait_settled
from tests.helpers import row

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

SKEW = "+10s"
REAPER_INTERVAL = 0.5


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    if not found:
        pytest.fail("libfaketime not found: install Debian's faketime package (.ci/run does)")
    return found[0]


@pytest.fixture
def beat(
    fault_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``orchestrator beat`` with the host's (right) clock."""
    settings = fault_settings("beat", reaper_interval_seconds=REAPER_INTERVAL)
    log = (tmp_path / "beat.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "beat"],
        env=settings_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield process
    process.terminate()
    process.wait(timeout=20)
    log.close()


def db_now(db: Database) -> object:
    with db.engine.connect() as connection:
        return connection.execute(text("SELECT now()")).scalar_one()


def test_a_worker_with_a_skewed_clock_times_sessions_by_the_database_clock(
    fault_settings: Callable[..., Settings],
    db: Database,
    simulator: SimulatorServer,
    beat: subprocess.Popen[bytes],
    tmp_path: Path,
    clean_queues: None,
) -> None:
    settings = fault_settings("skewed", reaper_interval_seconds=REAPER_INTERVAL)
    worker = WorkerProcess(
        settings,
        tmp_path / "skewed-worker.log",
        env_extra={
            "LD_PRELOAD": libfaketime(),
            "FAKETIME": SKEW,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        },
    )
    producer = Producer(settings)
    try:
        before = db_now(db)
        producer.enqueue_start_session(request_id="skewed", avatar_id="a", max_duration_seconds=3)
        active = wait_settled(db, ["skewed"], timeout=30)["skewed"]
        after = db_now(db)
        assert active.status == "active"
        assert before <= active.start_sent_at <= after, "the start was timed by another clock"
        assert active.expires_at == active.start_sent_at + timedelta(seconds=3)

        ended = wait_until(
            lambda: (r := row(db, "skewed")).status == "ended" and r,
            timeout=20,
            what="the skewed worker reaps the session",
        )
    finally:
        producer.close()
        worker.stop()
    assert ended.end_reason == "MAX_DURATION_REACHED"
    lag = (ended.ended_at - ended.expires_at).total_seconds()
    assert 0 <= lag < REAPER_INTERVAL + 1.5, lag
    assert "Discarding revoked task" not in worker.log()  # no sweep dropped as expired
    # The history and the lifecycle events the skewed worker wrote are timed by the database
    # too (not 10 s ahead of it).
    finished = db_now(db)
    occurred = [t for _, t in event_times(db, "skewed")]
    assert len(occurred) >= 4 and all(before <= t <= finished for t in occurred), occurred


def event_times(db: Database, request_id: str) -> list[tuple[str, datetime]]:
    """(what, when) of every ``session_events`` row and event body of the request."""
    with db.engine.connect() as connection:
        history = connection.execute(
            text(
                "SELECT e.kind, e.occurred_at FROM session_events e"
                " JOIN sessions s ON s.id = e.session_id WHERE s.request_id = :r"
            ),
            {"r": request_id},
        ).all()
        bodies = connection.execute(
            text(
                "SELECT routing_key, body->>'occurred_at' FROM event_outbox"
                " WHERE body->>'request_id' = :r"
            ),
            {"r": request_id},
        ).all()
    return [(kind, at) for kind, at in history] + [
        (key, datetime.fromisoformat(at)) for key, at in bodies
    ]
