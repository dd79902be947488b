"""Messages that took a worker down (found by this suite): a body that is not Celery's
3-element list, or no ``id`` header. Celery's consumer raised on them outside the handlers it
guards ("Unrecoverable error"), the worker exited, and the unacked message went to the next
worker: a crash loop. Each must now be dead-lettered while the worker goes on serving; each
case gets its own worker, so one failure cannot hide the others."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestrator.db import Database
from orchestrator.simulator import SimulatorServer
from tests.amqp import publish_raw
from tests.conftest import WorkerProcess
from tests.faults.conftest import (
    dead_letter_ids,
    rows_by_request,
    take_dead_letters,
)
from tests.faults.test_bad_input import corpus_settings, wait_rows

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

POISON = {
    "body-null": {"body": b"null"},
    "body-object": {"body": json.dumps({"avatar_id": "a"}).encode()},
    "body-two-elements": {"body": json.dumps([[], {"avatar_id": "a"}]).encode()},
    "no-id-header": {"kwargs": {"avatar_id": "a"}, "drop_headers": ("id",)},
}


@pytest.mark.parametrize("name", list(POISON))
def test_poison_body_is_dead_lettered_and_the_worker_survives(
    name: str,
    tmp_path: Path,
    database_url: str,
    broker_url: str,
    simulator: SimulatorServer,
    db: Database,
    clean_queues: None,
) -> None:
    settings = corpus_settings(tmp_path / "state", database_url, broker_url, simulator.base_url)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        publish_raw(broker_url, {"request_id": "warm-up", "avatar_id": "a"})
        wait_rows(db, ["warm-up"], "active", 20)
        task_id = publish_raw(broker_url, **POISON[name])
        publish_raw(broker_url, {"request_id": "after", "avatar_id": "a"})
        deadline = time.monotonic() + 15
        while True:
            crashed = worker.process.poll() is not None or "Unrecoverable error" in worker.log()
            assert not crashed, f"worker crashed: {worker.log()[-1500:]}"
            found = rows_by_request(db)
            if "after" in found and found["after"].status == "active":
                break
            assert time.monotonic() < deadline, "the good message after the poison was not served"
            time.sleep(0.1)
        time.sleep(0.5)
        assert worker.process.poll() is None and "Unrecoverable error" not in worker.log()
        assert task_id in dead_letter_ids(take_dead_letters(broker_url))
    finally:
        if "Unrecoverable error" in worker.log():
            worker.kill()  # a crashed worker can take long to shut down on its own
        worker.stop()
