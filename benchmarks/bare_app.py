"""The P1 baseline: a bare Celery app with a no-op task and the orchestrator's worker settings
(JSON only, late acks, reject on worker lost, prefetch multiplier 1, a durable queue with the
same dead-letter argument, no gossip/mingle/events; pool and concurrency given on the command
line). Completion times are kept by a ``task_postrun`` handler and written to
``BENCH_DONE_FILE`` once ``BENCH_EXPECTED`` tasks have run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

QUEUE = Queue(
    "bench.bare",
    Exchange("bench.bare", type="direct", durable=True),
    routing_key="bench.bare",
    durable=True,
    queue_arguments={"x-dead-letter-exchange": "bench.dlx"},
)


def make_app(broker_url: str) -> Celery:
    """The baseline app; the benchmark process uses it to publish, the worker to consume."""
    celery = Celery("bench_bare", broker=broker_url, set_as_current=False)
    celery.conf.update(CONFIG)
    return celery


CONFIG: dict[str, Any] = {
    "task_serializer": "json",
    "accept_content": ["json"],
    "task_ignore_result": True,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "task_queues": (QUEUE,),
    "task_default_queue": "bench.bare",
    "task_create_missing_queues": False,
    "broker_transport_options": {"confirm_publish": True},
    "worker_hijack_root_logger": False,
    "worker_send_task_events": False,
}
app = make_app(os.environ.get("BENCH_BROKER_URL", "memory://"))


@app.task(name="bench.noop", acks_late=True, reject_on_worker_lost=True)
def noop(**_: Any) -> None:
    """Does nothing: the baseline is the cost of Celery and the broker alone."""


@app.task(name="bench.sleep", acks_late=True, reject_on_worker_lost=True)
def sleep(seconds: float = 1.0, **_: Any) -> None:
    """Waits like a vendor call would, holding no lock: the pool's own concurrency ceiling."""
    time.sleep(seconds)


_done: list[float] = []
_lock = threading.Lock()


@signals.task_postrun.connect
def _record(**_: Any) -> None:
    now = time.time()
    with _lock:
        _done.append(now)
        finished = len(_done) == int(os.environ.get("BENCH_EXPECTED", "0"))
        times = list(_done) if finished else None
    if times is not None:
        _write(times)


def _write(times: list[float]) -> None:
    target = Path(os.environ["BENCH_DONE_FILE"])
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(times))
    tmp.rename(target)


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    """Stopped before ``BENCH_EXPECTED`` (a timed window): write what ran."""
    target = os.environ.get("BENCH_DONE_FILE")
    if target and not Path(target).exists():
        with _lock:
            _write(list(_done))


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    ready = os.environ.get("BENCH_READY_FILE")
    if ready:
        Path(ready).write_text("ready")
