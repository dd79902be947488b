"""A three-node RabbitMQ cluster of the run's own (tests/rabbit_cluster.py) with quorum queues:

- the node holding ``orchestrator.start``'s leader is killed with SIGKILL while starts are
  queued and in flight, and restarted: workers, beat and the producer (kombu's failover list
  in ``ORCHESTRATOR_BROKER_URL``) move to another node; every request ends ``active`` with
  exactly one vendor session, nothing is left in any queue, the workers go on consuming;
- a message that kills every worker that takes it is dead-lettered after the delivery limit
  (``x-death`` reason ``delivery_limit``) while good messages keep flowing.

The machine's RabbitMQ on 5672 is not touched. Skipped only where ``rabbitmq-server`` is not
installed.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import text

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.messaging import CONTROL_QUEUE, DEAD_LETTER_QUEUE, START_QUEUE
from orchestrator.producer import Producer, PublishError
from orchestrator.publishing import topology
from orchestrator.simulator import SimulatorServer
from tests.amqp import publish_raw
from tests.conftest import WorkerProcess
from tests.faults.conftest import (
    audit_vendor,
    event_counts,
    kill_worker,
    rows_by_request,
    wait_settled,
)
from tests.rabbit_cluster import RabbitCluster

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.worker]

STARTS_BEFORE = 16  # queued and in flight when the node dies
STARTS_DURING = 8  # published while the node is down
STARTS_AFTER = 4  # after it is back
POISON_DELIVERY_LIMIT = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed: no cluster to test failover on")
    if os.geteuid() != 0:
        pytest.fail("the cluster test starts RabbitMQ nodes as the rabbitmq user: run as root")
    started = time.monotonic()
    with RabbitCluster() as running:
        print(f"\ncluster of three up in {time.monotonic() - started:.1f} s")
        yield running


@pytest.fixture
def vhost(cluster: RabbitCluster) -> str:
    name = f"orch_cluster_{uuid.uuid4().hex[:8]}"
    cluster.add_vhost(name)
    return name


@pytest.fixture
def cluster_settings(fault_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """The fault suite's settings (tests/faults/conftest.py), on a broker URL given."""

    def make(name: str, broker_url: str, **overrides: Any) -> Settings:
        return fault_settings(name, broker_url=broker_url, **overrides)

    return make


def declare(settings: Settings, url: str) -> None:
    with Connection(url) as conn:
        topology(settings).declare(conn)


def wait_queues_empty(cluster: RabbitCluster, vhost: str, timeout: float) -> dict[str, int]:
    """Every queue of the vhost empty (work, dead-letter, and the delayed-delivery queues
    where countdown retries wait), but the control queue, where beat's ticks come and go;
    what is left after ``timeout`` (the broker's counts lag by up to its 5 s stats interval)."""
    deadline = time.monotonic() + timeout
    while True:
        depths = {k: v for k, v in cluster.depths(vhost).items() if k != CONTROL_QUEUE}
        if not any(depths.values()) or time.monotonic() > deadline:
            return {name: n for name, n in depths.items() if n}
        time.sleep(1)


def wait_outbox_relayed(db: Database, timeout: float) -> int:
    """Unpublished lifecycle events once none is left, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with db.engine.connect() as conn:
            left = int(
                conn.execute(
                    text("SELECT count(*) FROM event_outbox WHERE published_at IS NULL")
                ).scalar_one()
            )
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_losing_the_start_queue_leaders_node_loses_no_start_and_repeats_none(
    cluster: RabbitCluster,
    vhost: str,
    cluster_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    big_vendor: SimulatorServer,
) -> None:
    sim = big_vendor
    sim.configure(endpoint_latency="start=0.5")  # starts are in the vendor call at the kill
    declare(cluster_settings("declare", cluster.nodes[0].url(vhost)), cluster.nodes[0].url(vhost))
    leader = cluster.leader(START_QUEUE, vhost)
    url = cluster.failover_url(leader, vhost)  # every process connects to the leader first
    began = time.monotonic()
    workers = [
        start_worker(cluster_settings("one", url), "--beat", "--hostname", "one@%h"),
        start_worker(cluster_settings("two", url), "--hostname", "two@%h"),
    ]
    producer = Producer(cluster_settings("producer", url))
    accepted: list[str] = []
    refused: list[str] = []

    def enqueue(prefix: str, count: int) -> None:
        for number in range(count):
            rid = f"{prefix}-{number:02d}"
            try:
                accepted.append(producer.enqueue_start_session(request_id=rid, avatar_id=rid))
            except PublishError as error:
                refused.append(f"{rid}: {error}")

    restarted = threading.Event()
    try:
        enqueue("before", STARTS_BEFORE)
        deadline = time.monotonic() + 20
        while not any(r.status == "starting" for r in rows_by_request(db).values()):
            assert time.monotonic() < deadline, "no start in flight to lose"
            time.sleep(0.05)
        in_flight = sum(r.status == "starting" for r in rows_by_request(db).values())
        leader.kill()
        enqueue("during", STARTS_DURING)

        def restart() -> None:
            leader.start()
            leader.wait_up()
            restarted.set()

        restarter = threading.Thread(target=restart, daemon=True)
        restarter.start()
        restarter.join(120)
        assert restarted.is_set(), f"{leader.name} did not come back"
        enqueue("after", STARTS_AFTER)

        final = wait_settled(db, accepted, timeout=90, allowed=("active",))
        left = wait_queues_empty(cluster, vhost, timeout=60)
        # The workers still consume: one more start each, both alive.
        enqueue("later", 2)
        wait_settled(db, accepted, timeout=30, allowed=("active",))
        assert all(w.process.poll() is None for w in workers)
        unrelayed = wait_outbox_relayed(db, timeout=30)
    finally:
        producer.close()
        logs = [w.log() for w in workers]
        for worker in workers:
            kill_worker(worker)

    took = time.monotonic() - began
    assert not refused, f"publishes refused although two nodes of three were up: {refused}"
    assert not left, f"messages left in the queues: {left}"
    assert unrelayed == 0, "lifecycle events left in the outbox: the relay did not fail over"
    assert len(final) == STARTS_BEFORE + STARTS_DURING + STARTS_AFTER
    events = event_counts(db, ("active",))
    assert all(events.get((rid, "active"), 0) == 1 for rid in accepted), events
    audit = audit_vendor(db, sim)
    assert not audit.unowned, f"vendor sessions no request recorded: {audit.unowned}"
    assert len(audit.owned) == len(accepted)  # exactly one vendor session per request
    for name, log in zip(("one", "two"), logs, strict=True):
        assert "Connection to broker lost" in log, f"worker {name} never lost its node"
    print(
        f"\ncluster failover: {leader.name} (leader of {START_QUEUE}) killed with {in_flight}"
        f" starts in flight; {len(accepted)} starts, all active once, one vendor session each;"
        f" {took:.1f} s"
    )


def test_a_message_that_kills_every_worker_is_dead_lettered_after_the_delivery_limit(
    cluster: RabbitCluster,
    vhost: str,
    cluster_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    big_vendor: SimulatorServer,
) -> None:
    """The worker's crash is played by the test: each worker that takes the poison message
    (its log says it received that task id) is SIGKILLed at once, as a segfault or the OOM
    killer would. The poison carries an ETA an hour ahead, so that taking it does nothing
    else: the delivery count is all that changes between two deliveries."""
    url = cluster.failover_url(cluster.nodes[0], vhost)
    settings = cluster_settings("poison", url, delivery_limit=POISON_DELIVERY_LIMIT)
    declare(settings, url)
    worker = start_worker(settings)
    good: list[str] = []

    def serve_one_more() -> None:
        rid = f"good-{len(good)}"
        good.append(rid)
        publish_raw(url, {"request_id": rid, "avatar_id": "a"})

    eta = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    poison = publish_raw(url, {"request_id": "poison", "avatar_id": "a"}, headers={"eta": eta})
    kills = 0
    dead: list[Any] = []
    try:
        while not dead:
            serve_one_more()
            wait_settled(db, good, timeout=30, allowed=("active",))
            deadline = time.monotonic() + 20
            while f"[{poison}] received" not in worker.log():
                dead = take_dead(url)
                if dead or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if dead:
                break
            assert time.monotonic() <= deadline, f"no worker took the poison: {worker.log()}"
            kill_worker(worker)
            kills += 1
            assert kills <= POISON_DELIVERY_LIMIT + 1, "redelivered past the delivery limit"
            worker = start_worker(settings)
            dead = take_dead(url)
        serve_one_more()
        wait_settled(db, good, timeout=30, allowed=("active",))
        assert worker.process.poll() is None
        # While the last worker runs: it acknowledges a start just after the row is active.
        left = wait_queues_empty(cluster, vhost, timeout=30)  # the broker's counts lag ~5 s
    finally:
        kill_worker(worker)

    assert kills == POISON_DELIVERY_LIMIT + 1, kills  # the first delivery and LIMIT more
    assert [(m.headers or {}).get("id") for m in dead] == [poison]
    deaths = dead[0].headers["x-death"]
    assert deaths[0]["reason"] == "delivery_limit", deaths
    assert deaths[0]["queue"] == START_QUEUE
    assert "poison" not in rows_by_request(db)  # never ran: the ETA was never reached
    assert not left, f"messages left in the queues: {left}"


def take_dead(url: str) -> list[Any]:
    found = []
    with Connection(url) as conn:
        channel: Any = conn.default_channel
        while (message := channel.basic_get(DEAD_LETTER_QUEUE, no_ack=True)) is not None:
            found.append(message)
    return found
