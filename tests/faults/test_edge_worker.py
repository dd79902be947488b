"""Edge cases that need real worker processes and RabbitMQ: a body only JSON's lax readers
accept, a task that gives up, a worker running wide, and stops sent while every start thread
is busy."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from orchestrator.config import DEFAULT_START_THREADS, Settings
from orchestrator.db import Database
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorServer
from tests.amqp import publish_raw
from tests.conftest import WorkerProcess, wait_until
from tests.faults.conftest import (
    dead_letter_ids,
    take_dead_letters,
    via_proxy,
    wait_settled,
)
from tests.faults.tcp_proxy import TcpProxy
from tests.helpers import row, row_or_none
from tests.test_helm_chart import render, required_values

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

SECRET = "sk-customer-secret-77aa"


def test_non_finite_numbers_in_a_raw_body_make_a_failed_row_not_a_dead_letter(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    broker_url: str,
    simulator: SimulatorServer,
    clean_queues: None,
) -> None:
    start_worker(fault_settings())
    body = b'[[], {"request_id": "nan-1", "avatar_id": "a", "metadata": {"x": NaN}}, {}]'
    task_id = publish_raw(broker_url, body=body)
    r = wait_settled(db, ["nan-1"], timeout=20)["nan-1"]
    assert (r.status, r.error_code) == ("failed", "VALIDATION_ERROR")
    assert "'metadata.x'" in (r.error_message or "")
    assert task_id not in dead_letter_ids(take_dead_letters(broker_url))


def test_a_start_that_gives_up_after_its_retries_logs_no_kwargs_and_is_dead_lettered(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    database_url: str,
    broker_url: str,
    pg_proxy: TcpProxy,
    simulator: SimulatorServer,
    clean_queues: None,
) -> None:
    pg_proxy.cut()  # the worker's database is unreachable for the whole test
    worker = start_worker(fault_settings(database_url=via_proxy(database_url, pg_proxy)))
    kwargs = {
        "request_id": "gives-up",
        "avatar_id": "a",
        "avatar_persona": {
            "llm_configurations": {"custom_http": {"headers": {"Authorization": SECRET}}}
        },
    }
    # A message already retried as often as the task allows: this is its last try.
    task_id = publish_raw(broker_url, kwargs, headers={"retries": 100})
    wait_until(
        lambda: task_id in dead_letter_ids(take_dead_letters(broker_url)),
        timeout=30,
        what="the exhausted start is dead-lettered",
    )
    worker.stop()
    log = worker.log()
    assert "gave up" in log, log[-2000:]
    assert SECRET not in log


def test_a_worker_running_three_hundred_threads_serves_three_hundred_slow_starts(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    broker_url: str,
    big_vendor: SimulatorServer,
    clean_queues: None,
) -> None:
    big_vendor.configure(endpoint_latency="start=2.0")
    settings = fault_settings(
        start_timeout_seconds=120.0,
        vendor_timeout_seconds=5.0,
        stop_retry_seconds=10.0,
        orphan_grace_seconds=30.0,
    )
    start_worker(settings, "--concurrency", "300", "--queues", "orchestrator.start")
    producer = Producer(settings)
    request_ids = [f"wide-{i:03d}" for i in range(300)]
    try:
        for rid in request_ids:
            producer.enqueue_start_session(request_id=rid, avatar_id="a")
    finally:
        producer.close()
    final = wait_settled(db, request_ids, timeout=180)
    assert {r.status for r in final.values()} == {"active"}
    assert len(big_vendor.sessions()) == 300
    assert take_dead_letters(broker_url) == []


def chart_worker_commands() -> list[list[str]]:
    """The ``orchestrator worker`` arguments of the chart's default deployment."""
    commands = []
    for doc in render(required_values()):
        if doc.get("kind") != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            line = [*container.get("command", []), *container.get("args", [])]
            if "worker" in line:
                commands.append(line[line.index("worker") + 1 :])
    return commands


SLOW_SETTINGS = {
    "start_timeout_seconds": 120.0,
    "vendor_timeout_seconds": 20.0,
    "stop_retry_seconds": 30.0,
    "orphan_grace_seconds": 60.0,
}


def test_a_stop_is_carried_out_at_once_while_every_start_thread_is_busy(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    big_vendor: SimulatorServer,
    clean_queues: None,
) -> None:
    """Run the workers the chart's default values run, fill every start thread with a slow
    vendor start, then stop a session: the stop must not wait behind the starts."""
    commands = chart_worker_commands()
    assert commands, "the chart's default values run no worker"
    for i, args in enumerate(commands):
        start_worker(
            fault_settings(f"chart-{i}", **SLOW_SETTINGS),
            *args,
            "--hostname",  # one per pod in the chart; here they share a host
            f"chart-{i}@%h",
            bare=True,
        )
    concurrency = max(int(args[args.index("--concurrency") + 1]) for args in commands)
    assert_a_stop_does_not_wait_behind_starts(fault_settings, db, big_vendor, concurrency)


def test_a_worker_with_no_options_carries_out_a_stop_while_every_start_thread_is_busy(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    big_vendor: SimulatorServer,
    clean_queues: None,
) -> None:
    """``orchestrator worker`` as compose and a first install run it: one pool on both queues,
    whose stops and sweeps must still not wait for a start thread."""
    start_worker(fault_settings("bare", **SLOW_SETTINGS), bare=True)
    assert_a_stop_does_not_wait_behind_starts(fault_settings, db, big_vendor, DEFAULT_START_THREADS)


def assert_a_stop_does_not_wait_behind_starts(
    fault_settings: Callable[..., Settings],
    db: Database,
    big_vendor: SimulatorServer,
    concurrency: int,
) -> None:
    producer = Producer(fault_settings(**SLOW_SETTINGS))
    try:
        producer.enqueue_start_session(request_id="to-stop", avatar_id="a")
        wait_settled(db, ["to-stop"], timeout=20)
        big_vendor.configure(endpoint_latency="start=15")
        slow = [f"slow-{i:03d}" for i in range(concurrency + 8)]
        for rid in slow:
            producer.enqueue_start_session(request_id=rid, avatar_id="a")
        wait_until(
            lambda: big_vendor.stats()["endpoints"]["start"]["in_flight"] >= concurrency,
            timeout=60,
            what="every start thread busy in a vendor call",
        )
        asked = time.monotonic()
        producer.request_stop(request_id="to-stop")
        wait_until(
            lambda: row(db, "to-stop").status == "ended",
            timeout=10,
            interval=0.05,
            what="the stop carried out",
        )
        took = time.monotonic() - asked
    finally:
        producer.close()
    assert took < 2.0, f"the stop waited {took:.1f} s behind the starts"
    assert row_or_none(db, "slow-000") is not None
