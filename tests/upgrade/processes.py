"""Processes of two releases side by side: workers and beat as subprocesses, their output in
log files, and raw Celery messages (docs/messages.md) that any release understands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from kombu import Connection

from tests.amqp import celery_headers

NEW = [sys.executable, "-m", "orchestrator.cli"]  # this checkout's code
START_SECONDS = 60


class Process:
    """One ``orchestrator`` command of either release; ready when ``ready`` exists."""

    def __init__(
        self, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path, ready: Path | None
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        if ready is not None:
            ready.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_SECONDS
        while ready is not None and not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{' '.join(argv[-2:])} did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (a warm shutdown, as Kubernetes does), SIGKILL after 30 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=180, check=False
    )


def publish(broker_url: str, task: str, queue: str, kwargs: dict[str, Any]) -> None:
    """A task message on ``queue``'s exchange (same name, routing key the queue's name), as a
    non-Python producer sends it; the exchange is not declared (classic and quorum topologies
    differ in its type)."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None}])
    with Connection(broker_url, connect_timeout=10) as conn:
        conn.Producer().publish(
            body.encode(),
            exchange=queue,
            routing_key=queue,
            headers=celery_headers(task, task_id),
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            correlation_id=task_id,
            retry=True,
            retry_policy={"max_retries": 3},
            timeout=10,
        )


def start(broker_url: str, request_id: str, max_duration_seconds: int) -> None:
    publish(
        broker_url,
        "orchestrator.start_session",
        "orchestrator.start",
        {
            "request_id": request_id,
            "avatar_id": "avatar-upgrade",
            "max_duration_seconds": max_duration_seconds,
        },
    )


def stop(broker_url: str, request_id: str) -> None:
    publish(
        broker_url,
        "orchestrator.stop_session",
        "orchestrator.control",
        {"request_id": request_id, "reason": "USER_CLOSED"},
    )


def dead_letters(broker_url: str) -> int:
    """How many messages wait in ``orchestrator.dead`` (a passive declare)."""
    with Connection(broker_url, connect_timeout=10) as conn:
        channel = conn.channel()
        _name, count, _consumers = channel.queue_declare("orchestrator.dead", passive=True)
        return int(count)
