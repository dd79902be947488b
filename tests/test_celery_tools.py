"""Celery's own tools against a real worker: `celery -A orchestrator inspect ping` and `purge`
with nothing but the environment, and task events only when `orchestrator worker --events`."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery.events.event import get_exchange
from kombu import Connection, Queue

from orchestrator.config import Settings
from orchestrator.messaging import START_QUEUE, Topology
from orchestrator.producer import Producer
from tests.amqp import publish_raw
from tests.conftest import WorkerProcess, settings_env

pytestmark = [pytest.mark.broker, pytest.mark.worker, pytest.mark.postgres]


def celery(settings: Settings, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`celery -A orchestrator ...` as an operator runs it: the deployment's environment only."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "orchestrator", *args],
        env=settings_env(settings),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def queue_depth(broker_url: str, name: str) -> int:
    with Connection(broker_url) as conn:
        _, depth, _ = Topology().work_queue(name)(conn.default_channel).queue_declare(passive=True)
    return int(depth)


def task_events(broker_url: str, during: Callable[[], None]) -> list[dict[str, Any]]:
    """The task events (Celery's ``celeryev`` exchange, what Flower reads) sent while
    ``during`` runs and up to 8 s after."""
    seen: list[dict[str, Any]] = []

    def collect(body: Any, message: Any) -> None:
        seen.extend(body if isinstance(body, list) else [body])  # task events come in batches

    with Connection(broker_url) as conn:
        exchange = get_exchange(conn)
        queue = Queue(f"test-celeryev-{uuid.uuid4().hex[:6]}", exchange, "task.#", auto_delete=True)
        with conn.Consumer(queue, callbacks=[collect], accept=["json"]):
            during()
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and not any(
                e.get("type") == "task-succeeded" for e in seen
            ):
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.5)
    return seen


def stop_unknown(settings: Settings) -> Callable[[], None]:
    def run() -> None:
        producer = Producer(settings)
        try:
            # By the vendor's id: a stop for an unknown one is not remembered (nothing is left
            # in early_stops for the tests that follow).
            producer.request_stop(session_id="tools-no-such-vendor-session")
        finally:
            producer.close()

    return run


def test_inspect_ping_and_purge_find_the_app_from_the_environment(
    settings_for: Callable[..., Settings],
    broker_url: str,
    purge_queues: Callable[[], None],
    db: object,
    tmp_path: Path,
) -> None:
    purge_queues()
    settings = settings_for(broker_url=broker_url, orphan_grace_seconds=5.0)
    # A worker on the control queue only: a start message waits in its queue for `purge`.
    worker = WorkerProcess(
        settings,
        tmp_path / "worker.log",
        "--queues",
        "orchestrator.control",
        "--hostname",
        "tools@%h",
    )
    try:
        ping = celery(settings, "inspect", "ping", "--timeout", "10", cwd=tmp_path)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "tools@" in ping.stdout and "pong" in ping.stdout

        publish_raw(broker_url, {"request_id": "tools-purge", "avatar_id": "a"})
        assert queue_depth(broker_url, START_QUEUE) == 1
        purged = celery(settings, "purge", "-f", "-Q", START_QUEUE, cwd=tmp_path)
        assert purged.returncode == 0, purged.stdout + purged.stderr
        assert "Purged 1 message" in purged.stdout
        assert queue_depth(broker_url, START_QUEUE) == 0
    finally:
        worker.stop()


@pytest.mark.parametrize("events", [True, False], ids=["--events", "default"])
def test_task_events_only_when_switched_on(
    events: bool,
    settings_for: Callable[..., Settings],
    broker_url: str,
    purge_queues: Callable[[], None],
    db: object,
    tmp_path: Path,
) -> None:
    purge_queues()
    settings = settings_for(broker_url=broker_url, orphan_grace_seconds=5.0)
    options = ("--events",) if events else ()
    worker = WorkerProcess(settings, tmp_path / "worker.log", *options)
    try:
        seen = task_events(broker_url, stop_unknown(settings))
    finally:
        worker.stop()
    kinds = {e["type"] for e in seen if e.get("name", "") in ("", "orchestrator.stop_session")}
    if events:
        assert {"task-received", "task-started", "task-succeeded"} <= kinds, kinds
    else:
        assert not seen, seen
