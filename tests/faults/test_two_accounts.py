"""The fault suite's two-account mode (``FAULTS_ACCOUNTS=2``, tests/faults/conftest.py) really
puts the work on both accounts, and a worker's stops reach each session with its own
account's key; with one account, all of it stays on ``default``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.conftest import WorkerProcess, wait_until
from tests.faults.conftest import FAULT_ACCOUNTS, SECOND_ACCOUNT, wait_settled

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]


def test_starts_spread_over_the_configured_accounts_and_stops_use_each_rows_key(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    big_vendor: SimulatorServer,
    clean_queues: None,
) -> None:
    settings = fault_settings()
    start_worker(settings)
    producer = Producer(settings)
    try:
        ids = [
            producer.enqueue_start_session(avatar_id="a", request_id=f"two-{i}") for i in range(8)
        ]
        rows = wait_settled(db, ids, 30, allowed=("active",))
        expected = {"default", SECOND_ACCOUNT} if FAULT_ACCOUNTS == 2 else {"default"}
        assert {r.account for r in rows.values()} == expected
        by_vendor = {s["session_id"]: s["account"] for s in big_vendor.sessions("active")}
        assert {r.vendor_session_id: r.account for r in rows.values()} == by_vendor
        for rid in ids:
            producer.request_stop(request_id=rid)
        wait_settled(db, ids, 30, allowed=("ended",))
    finally:
        producer.close()
    # Each vendor session ended by a stop call it accepted, i.e. made with its account's key.
    wait_until(lambda: not big_vendor.sessions("active"), 10, what="vendor sessions ended")
    assert {s["ended_by"] for s in big_vendor.sessions()} == {"stop"}, big_vendor.sessions()
