"""RabbitMQ restarts (``rabbitmqctl stop_app`` / ``start_app``: durable queues and persistent
messages survive) during a stream of enqueues from the Python producer and while starts run.

Every request_id that ``enqueue_start_session`` returned ends in a row (publisher confirms:
accepted means stored), what could not be published raised ``PublishError`` (never a silent
drop, never another exception type), and the workers reconnect on their own.

The rest of the suite shares this RabbitMQ: it is brought back (and checked with a real
connection) before the test returns, whatever happened.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.producer import Producer, PublishError
from orchestrator.simulator import SimulatorServer
from tests.conftest import WorkerProcess
from tests.faults.conftest import (
    ORPHAN_BOUND_SECONDS,
    assert_live_vendor_sessions_have_live_rows,
    assert_rows_are_final_and_explained,
    ensure_rabbit_up,
    event_counts,
    kill_worker,
    queue_depths,
    rabbitmqctl,
    rows_by_request,
    wait_no_unowned_vendor_sessions,
    wait_settled,
)

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

ENQUEUE_GAP_SECONDS = 0.1
PRODUCER_PUBLISH_BOUND_SECONDS = 2.0  # ORCHESTRATOR_PUBLISH_TIMEOUT_SECONDS of the producer
BROKER_DOWN_SECONDS = 4.0  # past the producer's publish bound: some publish fails
STREAM_AFTER_RESTART_SECONDS = 1.5


class Enqueuer(threading.Thread):
    """Enqueues starts one after another until stopped, recording what each call did."""

    def __init__(self, producer: Producer, prefix: str = "mq-") -> None:
        super().__init__(daemon=True)
        self.producer = producer
        self.prefix = prefix
        self.accepted: list[str] = []
        self.refused: list[str] = []  # PublishError: the producer said it was not enqueued
        self.other_errors: Counter[str] = Counter()
        self.stop_event = threading.Event()

    def run(self) -> None:
        number = 0
        while not self.stop_event.is_set():
            rid = f"{self.prefix}{number:03d}"
            number += 1
            try:
                accepted = self.producer.enqueue_start_session(request_id=rid, avatar_id=rid)
            except PublishError:
                self.refused.append(rid)
            except Exception as error:  # any other type breaks the producer's contract
                self.other_errors[type(error).__name__] += 1
                self.refused.append(rid)
            else:
                assert accepted == rid
                self.accepted.append(rid)
            time.sleep(ENQUEUE_GAP_SECONDS)


def wait_rows_or_stall(
    db: Database, request_ids: list[str], timeout: float, stall_after: float
) -> bool:
    """Wait until every request has a row; False if no new row appeared for ``stall_after``."""
    deadline = time.monotonic() + timeout
    seen, progress_at = -1, time.monotonic()
    while time.monotonic() < deadline:
        found = rows_by_request(db, request_ids)
        if len(found) == len(request_ids):
            return True
        if len(found) != seen:
            seen, progress_at = len(found), time.monotonic()
        elif time.monotonic() - progress_at > stall_after:
            return False
        time.sleep(0.25)
    return False


def test_broker_restart_loses_no_accepted_start(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    broker_url: str,
    db: Database,
    big_vendor: SimulatorServer,
    clean_queues: None,
) -> None:
    sim = big_vendor
    sim.configure(endpoint_latency="start=0.3")  # starts are in flight when the broker goes
    worker_settings = fault_settings("one")
    workers = [
        start_worker(worker_settings, "--beat", "--hostname", "one@%h"),
        start_worker(fault_settings("two"), "--hostname", "two@%h"),
    ]
    producer = Producer(
        fault_settings("producer", publish_timeout_seconds=PRODUCER_PUBLISH_BOUND_SECONDS)
    )
    enqueuer = Enqueuer(producer)
    logs: list[str] = []
    try:
        enqueuer.start()
        time.sleep(1.0)
        accepted_before = len(enqueuer.accepted)
        restart_began = time.monotonic()
        try:
            rabbitmqctl("stop_app")
            stopped_after = time.monotonic() - restart_began
            time.sleep(BROKER_DOWN_SECONDS)
        finally:
            rabbitmqctl("start_app")
            ensure_rabbit_up(broker_url)
        restart_took = time.monotonic() - restart_began
        time.sleep(STREAM_AFTER_RESTART_SECONDS)
        enqueuer.stop_event.set()
        enqueuer.join(30)
        accepted_after = enqueuer.accepted[accepted_before:]

        # The workers reconnect by themselves and serve every accepted start.
        served = wait_rows_or_stall(db, enqueuer.accepted, timeout=60, stall_after=8)
        assert served, f"the workers stopped consuming: {queue_depths(broker_url)} waiting"
        final = wait_settled(db, enqueuer.accepted, timeout=60)
        audit = wait_no_unowned_vendor_sessions(db, sim)
    finally:
        enqueuer.stop_event.set()
        producer.close()
        ensure_rabbit_up(broker_url)  # the rest of the suite needs it, even after a failure
        logs = [w.log() for w in workers]
        for worker in workers:  # a stalled worker would not finish a warm shutdown
            kill_worker(worker)

    assert not enqueuer.other_errors, f"the producer raised {dict(enqueuer.other_errors)}"
    # The restart reached both workers (they logged the loss) and the producer (PublishError),
    # else the test proved nothing; each worker connected again after its last loss.
    for name, log in zip(("one", "two"), logs, strict=True):
        assert "Connection to broker lost" in log, f"worker {name} never lost the broker"
        assert "Connected to amqp" in log.split("Connection to broker lost")[-1], name
    assert enqueuer.refused, "the restart never reached the producer: the test proved nothing"
    assert accepted_after, "nothing was accepted after the restart"
    assert_rows_are_final_and_explained(final, enqueuer.accepted)
    assert all(final[rid].status == "active" for rid in enqueuer.accepted)
    events = event_counts(db, ("active",))
    assert all(events.get((rid, "active"), 0) == 1 for rid in enqueuer.accepted)
    assert audit.longest_unowned_life() <= ORPHAN_BOUND_SECONDS, audit.unowned
    assert_live_vendor_sessions_have_live_rows(db, sim)
    # A refused publish may still have reached the broker (its confirm was lost): at least once.
    refused_but_stored = [rid for rid in enqueuer.refused if rid in final]
    print(
        f"\nbroker restart (stop_app {stopped_after:.1f} s, up again after {restart_took:.1f} s): "
        f"{len(enqueuer.accepted)} accepted, all with a "
        f"row; {len(enqueuer.refused)} PublishError ({len(refused_but_stored)} of them stored "
        f"anyway); {len(audit.unowned)} unrecorded vendor sessions"
    )


RECONNECT_CYCLES = 4  # connection drops under load; the stall shows within one or two


def test_worker_keeps_consuming_after_its_broker_connection_drops(
    fault_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    broker_url: str,
    db: Database,
    big_vendor: SimulatorServer,
    clean_queues: None,
) -> None:
    big_vendor.configure(endpoint_latency="start=0.3")
    settings = fault_settings()
    worker = start_worker(settings)
    producer = Producer(settings)
    vhost = broker_url.rsplit("/", 1)[1]
    drained = False
    try:
        for cycle in range(RECONNECT_CYCLES):
            enqueuer = Enqueuer(producer, prefix=f"c{cycle}-")
            enqueuer.start()
            time.sleep(0.5)  # the worker's 8 threads are busy with vendor calls
            rabbitmqctl("close_all_connections", "--vhost", vhost, "fault test")
            time.sleep(1.5)
            enqueuer.stop_event.set()
            enqueuer.join(30)
            assert wait_rows_or_stall(db, enqueuer.accepted, timeout=30, stall_after=6), (
                f"cycle {cycle}: the worker stopped consuming after reconnecting "
                f"({queue_depths(broker_url)} messages waiting)"
            )
        assert worker.process.poll() is None
        drained = True
    finally:
        producer.close()
        if not drained:
            kill_worker(worker)  # a stalled worker would hold its unacked messages through SIGTERM
