"""Beat's periodic passes while Postgres is away: each pass is skipped and acked, none is
dead-lettered (the next beat runs it again). Before, every tick of the sweep, the reconciler
and the admission backstop that ran during an outage failed into ``orchestrator.dead``, 15 to 20
per chaos schedule: dead letters that hid the ones an operator must look at. Found by the
30-minute ``make chaos`` run of 2026-12-06: 144 in 12 of 26 schedules, 17 in seed 295898883
(``make chaos SEED=295898883``: pg-cut with a kill of the start worker)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.conftest import WorkerProcess
from tests.faults.conftest import take_dead_letters, via_proxy, wait_settled
from tests.faults.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

OUTAGE_SECONDS = 4.0  # eight ticks of the fault settings' 0.5 s reaper interval


def test_beat_passes_during_a_database_outage_are_skipped_not_dead_lettered(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    database_url: str,
    db: Database,
    broker_url: str,
    big_vendor: SimulatorServer,
    pg_proxy: TcpProxy,
    clean_queues: None,
) -> None:
    settings = fault_settings(database_url=via_proxy(database_url, pg_proxy))
    worker = start_worker(settings, "--beat")
    producer = Producer(settings)
    try:
        producer.enqueue_start_session(request_id="beat-before", avatar_id="a")
        wait_settled(db, ["beat-before"], timeout=30)
        take_dead_letters(broker_url)  # nothing of ours yet; start from an empty queue
        pg_proxy.cut()
        time.sleep(OUTAGE_SECONDS)
        pg_proxy.restore()
        # Served again after the outage, by the same worker.
        producer.enqueue_start_session(request_id="beat-after", avatar_id="a")
        wait_settled(db, ["beat-after"], timeout=30)
        time.sleep(2.0)  # a few more ticks: anything rejected meanwhile reaches the queue
        dead = take_dead_letters(broker_url)
    finally:
        producer.close()

    log = worker.log()
    assert worker.process.poll() is None, log[-3000:]
    tasks = sorted(str((m.headers or {}).get("task")) for m in dead)
    assert not dead, f"dead-lettered during the outage: {tasks}"
    assert "raised unexpected" not in log, log[-3000:]
    assert "pass skipped, the next beat runs it again" in log
