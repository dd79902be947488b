"""On quorum queues a task's countdown retry (the database is away) waits in the broker's
delay queues (Celery's native delayed delivery over topic exchanges), not in the worker's
memory: a worker restarted during a database outage loses no retry, and a long outage does
not pile retries up in one process."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from kombu import Connection

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.messaging import START_QUEUE
from orchestrator.simulator import SimulatorServer
from tests.amqp import publish_raw
from tests.conftest import WorkerProcess
from tests.faults.conftest import via_proxy, wait_settled
from tests.faults.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

DELAY_LEVELS = 28  # kombu's celery_delayed_0 … celery_delayed_27


def waiting_in_delay_queues(broker_url: str) -> int:
    total = 0
    with Connection(broker_url) as conn:
        for level in range(DELAY_LEVELS):
            channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(f"celery_delayed_{level}", passive=True)
            except Exception:  # not declared: nothing waits there
                continue
            total += int(count)
            channel.close()
    return total


def test_a_retry_while_the_database_is_away_waits_in_the_broker_not_in_the_worker(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    broker_url: str,
    database_url: str,
    db: Database,
    simulator: SimulatorServer,
    pg_proxy: TcpProxy,
    clean_queues: None,
) -> None:
    settings = fault_settings(database_url=via_proxy(database_url, pg_proxy))
    worker = start_worker(settings)
    pg_proxy.cut()
    try:
        publish_raw(broker_url, {"request_id": "delayed", "avatar_id": "a"})
        deadline = time.monotonic() + 30
        seen = 0
        while seen == 0:
            assert time.monotonic() < deadline, f"no retry in the broker: {worker.log()[-2000:]}"
            time.sleep(0.1)
            if "retry in" in worker.log():
                seen = waiting_in_delay_queues(broker_url)
        # The worker holds nothing meanwhile: restart it, the retry is not lost.
        worker.kill()
        with Connection(broker_url) as conn:
            _, ready, _ = conn.channel().queue_declare(START_QUEUE, passive=True)
        worker = start_worker(settings)
    finally:
        pg_proxy.restore()
    rows = wait_settled(db, ["delayed"], timeout=60, allowed=("active",))
    assert rows["delayed"].status == "active"
    assert seen >= 1 and ready + seen >= 1
