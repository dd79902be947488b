"""A three-node RabbitMQ cluster of the run's own (tests/rabbit_cluster.py) with quorum queues:

- the node holding ``orchestrator.start``'s leader is killed with SIGKILL while starts are
  queued and in flight, and restarted: workers, beat and the producer (kombu's failover list
  in ``ORCHESTRATOR_BROKER_URL``) move to another node; every request ends ``active`` with
  exactly one vendor session, nothing is left in any queue, the workers go on consuming;
- a message that kills every worker that takes it is dead-lettered after the delivery limit
  (``x-death`` reason ``delivery_limit``) while good messages keep flowing;
- under a disk alarm every publisher gives up within its bound (the producer with
  ``PublishError``, the event relay without holding a lock, a worker by requeuing);
- the broker-only events waiter sees every event across the loss of its node;
- two nodes of three lost, then back: publishes fail within their bound, nothing confirmed is
  lost, the worker and beat carry on.

The tests share one cluster (module scope); each leaves every node up and no alarm set.

The machine's RabbitMQ on 5672 is not touched. Skipped only where ``rabbitmq-server`` is not
installed.
"""

from __future__ import annotations

import functools
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
from orchestrator.db import Database, OutboxEvent
from orchestrator.messaging import CONTROL_QUEUE, DEAD_LETTER_QUEUE, START_QUEUE, events_exchange
from orchestrator.producer import Producer, PublishError, SessionEvents
from orchestrator.publishing import topology
from orchestrator.simulator import SimulatorServer
from orchestrator.worker.celery_app import create_app
from tests.amqp import publish_raw
from tests.conftest import WorkerProcess
from tests.faults.conftest import (
    audit_vendor,
    event_counts,
    kill_worker,
    rows_by_request,
    via_proxy,
    wait_settled,
)
from tests.faults.tcp_proxy import TcpProxy
from tests.rabbit_cluster import Node, RabbitCluster, rabbitmqctl

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


# --- Bounded publishes, waiters that survive a node, a lost majority (docs/reliability.md
# 51-60). They share the module's cluster: each leaves every node up and no alarm set.

PUBLISH_BOUND = 4.0  # ORCHESTRATOR_PUBLISH_TIMEOUT_SECONDS of these tests
REQUEUE_ETA_SECONDS = 8.0  # the alarm test's start runs this long after it was published
# The bound plus a connection attempt to each node of the failover list and scheduling slack.
BOUND_SLACK = 6.0


def timed_publish(publish: Callable[[], object]) -> tuple[BaseException | None, float, bool]:
    """Run ``publish`` in a thread of its own: (its error or None, seconds taken, whether it
    returned within the bound and its slack). A publish that hangs is left behind (daemon)."""
    outcome: list[BaseException | None] = []
    began = time.monotonic()

    def run() -> None:
        try:
            publish()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(PUBLISH_BOUND + BOUND_SLACK)
    took = time.monotonic() - began
    return (outcome[0] if outcome else None), took, bool(outcome)


def test_under_a_disk_alarm_every_publisher_gives_up_within_its_bound_and_loses_nothing(
    cluster: RabbitCluster,
    vhost: str,
    cluster_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    database_url: str,
    db: Database,
    big_vendor: SimulatorServer,
    pg_proxy: TcpProxy,
) -> None:
    """A disk alarm blocks every publishing connection of the cluster. Meanwhile:

    - the producer's ``enqueue_start_session`` and ``request_stop`` raise ``PublishError``
      within the bound;
    - the event relay gives up within the bound, holding no row lock (another transaction
      locks the outbox row at once, NOWAIT) and leaves the event for a later pass;
    - a worker whose start must be retried (its database is away) and whose retry cannot be
      published requeues the start and says so; the start is served once both are back.
      The start is published before the alarm with an ETA, so that it runs under it."""
    node = cluster.nodes[0]
    url = cluster.failover_url(node, vhost)
    bound = {"publish_timeout_seconds": PUBLISH_BOUND}
    settings = cluster_settings("alarm", url, **bound)
    declare(settings, url)
    producer = Producer(settings)
    producer.enqueue_start_session(request_id="before-alarm", avatar_id="a")
    relay_app = create_app(settings)
    event = OutboxEvent(routing_key="session.active", body=event_body("relayed"))
    worker = start_worker(
        cluster_settings("retrier", url, database_url=via_proxy(database_url, pg_proxy), **bound)
    )
    wait_settled(db, ["before-alarm"], timeout=30, allowed=("active",))
    # The worker takes this start at once and holds it until its ETA, by when the alarm is on
    # and the database away: its retry must be published under the alarm. (A retry published
    # before the alarm would wait in the delay queues: at-least-once dead-lettering, which
    # brings it back, pauses under an alarm.)
    eta = (datetime.now(UTC) + timedelta(seconds=REQUEUE_ETA_SECONDS)).isoformat()
    publish_raw(url, {"request_id": "requeued", "avatar_id": "a"}, headers={"eta": eta})
    pg_proxy.cut()
    results = []
    relay_locks: list[str] = []
    try:
        set_disk_alarm(cluster, node, on=True)
        results.append(
            timed_publish(lambda: producer.enqueue_start_session(request_id="x", avatar_id="a"))
        )
        results.append(timed_publish(lambda: producer.request_stop(request_id="x")))
        with db.transaction() as session:  # after the alarm: no worker's relay sent it before
            session.add(event)
        relay = threading.Thread(target=relay_app.dispatcher.relay.relay_now, daemon=True)
        relay.start()
        time.sleep(1.0)  # the relay is waiting for the broker's confirm
        relay_locks = outbox_locks_held(db)
        relay.join(PUBLISH_BOUND + BOUND_SLACK)
        results.append((None, 0.0, not relay.is_alive()))
        unrelayed_under_alarm = unpublished_events(db, event.event_id)
        deadline = time.monotonic() + PUBLISH_BOUND + BOUND_SLACK + 10
        while "message requeued" not in worker.log():
            assert time.monotonic() < deadline, (
                f"the worker never requeued its start: {worker.log()[-3000:]}"
            )
            time.sleep(0.2)
    finally:
        set_disk_alarm(cluster, node, on=False)
        pg_proxy.restore()
    try:
        for error, took, returned in results[:2]:
            assert returned, f"a publish under the alarm still blocked after {took:.1f} s"
            assert isinstance(error, PublishError), f"not PublishError: {error!r}"
            assert took <= PUBLISH_BOUND + BOUND_SLACK, took
        assert results[2][2], "the event relay still blocked past its bound"
        assert not relay_locks, f"the relay held a lock while it published: {relay_locks}"
        assert unrelayed_under_alarm == 1
        # The alarm cleared: the producer publishes again, the relay sends the event, the
        # requeued start is served.
        producer.enqueue_start_session(request_id="after-alarm", avatar_id="a")
        relay_app.dispatcher.relay.relay_now()
        assert unpublished_events(db, event.event_id) == 0
        wait_settled(db, ["requeued", "after-alarm"], timeout=60, allowed=("active",))
        assert not take_dead(url), "a message was dead-lettered"
        assert worker.log().count("message requeued") >= 1
    finally:
        producer.close()
        relay_app.close()
        kill_worker(worker)
    print(f"\ndisk alarm: PublishError after {', '.join(f'{r[1]:.1f} s' for r in results[:2])}")


def unpublished_events(db: Database, event_id: uuid.UUID) -> int:
    with db.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM event_outbox"
                    " WHERE published_at IS NULL AND event_id = :event_id"
                ),
                {"event_id": event_id},
            ).scalar_one()
        )


def outbox_locks_held(db: Database) -> list[str]:
    """What keeps this transaction from locking the unpublished outbox rows at once (NOWAIT),
    or sessions idle in a transaction: empty when no relay holds a lock or a transaction."""
    problems = []
    with db.engine.connect() as conn:
        try:
            conn.execute(
                text("SELECT id FROM event_outbox WHERE published_at IS NULL FOR UPDATE NOWAIT")
            ).all()
        except Exception as error:  # LockNotAvailable: someone holds the row
            problems.append(type(error).__name__)
        conn.rollback()
        idle = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
        if idle:
            problems.append(f"{idle} session(s) idle in transaction")
    return problems


def set_disk_alarm(cluster: RabbitCluster, node: Node, *, on: bool) -> None:
    """A disk alarm on ``node`` (a free-disk limit far above the disk's size), or none."""
    rabbitmqctl(node.name, "set_disk_free_limit", "1000000000000000" if on else "50000000")
    deadline = time.monotonic() + 30
    while ("disk" in rabbitmqctl(node.name, "eval", "rabbit_alarm:get_alarms().")) != on:
        assert time.monotonic() < deadline, (
            f"disk alarm on {node.name} not {'set' if on else 'cleared'}"
        )
        time.sleep(0.2)


def event_body(request_id: str) -> dict[str, Any]:
    return {"request_id": request_id, "status": "active", "session_id": f"s-{request_id}"}


def publish_events(url: str, request_ids: list[str], timeout: float = 60) -> None:
    """Lifecycle events as the relay publishes them (persistent, confirmed), each published
    again until the broker confirms it (a leader election refuses publishes for a while)."""
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        producer = conn.Producer()
        for rid in request_ids:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    producer.publish(
                        event_body(rid),
                        exchange=events_exchange,
                        routing_key="session.active",
                        serializer="json",
                        delivery_mode=2,
                        retry=True,
                        retry_policy={"max_retries": 3, "interval_start": 0.5},
                    )
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)


def test_the_events_waiter_sees_every_event_across_the_loss_of_its_node(
    cluster: RabbitCluster, vhost: str, cluster_settings: Callable[..., Settings]
) -> None:
    """The waiter is connected to the first node of its failover list; that node is killed,
    and events are published (through another node) while the waiter reconnects."""
    victim = cluster.nodes[1]
    settings = cluster_settings("waiter", cluster.failover_url(victim, vhost))
    declare(settings, victim.url(vhost))
    other = cluster.nodes[2].url(vhost)
    before = [f"before-{n}" for n in range(3)]
    during = [f"during-{n}" for n in range(5)]
    missing: list[str] = []
    with SessionEvents(settings) as events:
        publish_events(other, before)
        for rid in before:
            events.wait(rid, timeout=10)
        victim.kill()
        try:
            publish_events(other, during)
            for rid in during:
                try:
                    events.wait(rid, timeout=20 if not missing else 1)
                except TimeoutError:
                    missing.append(rid)
        finally:
            victim.start()
            victim.wait_up()
    assert not missing, f"events the waiter never saw after {victim.name} died: {missing}"


def test_a_lost_majority_refuses_publishes_within_the_bound_and_loses_nothing_confirmed(
    cluster: RabbitCluster,
    vhost: str,
    cluster_settings: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
    db: Database,
    big_vendor: SimulatorServer,
) -> None:
    """Two nodes of three SIGKILLed (the start queue's leader among them), then restarted:
    every publish meanwhile returns within the bound (PublishError, or confirmed when it got
    through before the loss was noticed); every confirmed start is served once the majority
    is back; the workers and beat carry on (beat's ticks reach the workers again)."""
    declare(cluster_settings("declare", cluster.nodes[0].url(vhost)), cluster.nodes[0].url(vhost))
    leader = cluster.leader(START_QUEUE, vhost)
    survivor = next(n for n in cluster.nodes if n is not leader)
    lost = [n for n in cluster.nodes if n is not survivor]
    url = cluster.failover_url(survivor, vhost)
    overrides = {"publish_timeout_seconds": PUBLISH_BOUND}
    worker = start_worker(cluster_settings("lost", url, **overrides), "--beat")
    producer = Producer(cluster_settings("producer", url, **overrides))
    accepted: list[str] = []
    slow: list[str] = []
    refused = 0
    try:
        for number in range(4):
            rid = f"before-{number}"
            accepted.append(producer.enqueue_start_session(request_id=rid, avatar_id=rid))
        wait_settled(db, accepted, timeout=60, allowed=("active",))
        for node in lost:
            node.kill()
        for number in range(3):
            rid = f"during-{number}"
            error, took, returned = timed_publish(
                functools.partial(producer.enqueue_start_session, request_id=rid, avatar_id=rid)
            )
            if not returned or took > PUBLISH_BOUND + BOUND_SLACK:
                slow.append(f"{rid}: {took:.1f} s")
            elif error is None:
                accepted.append(rid)
            else:
                assert isinstance(error, PublishError), repr(error)
                refused += 1
        assert not slow, f"publishes that outlasted their bound without a majority: {slow}"
        RabbitCluster._each(lambda node: node.start(), lost)
        RabbitCluster._each(lambda node: node.wait_up(), lost)
        ticks = worker.log().count("orchestrator.reconcile_sessions")
        for number in range(4):
            rid = f"after-{number}"
            accepted.append(producer.enqueue_start_session(request_id=rid, avatar_id=rid))
        final = wait_settled(db, accepted, timeout=120, allowed=("active",))
        deadline = time.monotonic() + 30
        while worker.log().count("orchestrator.reconcile_sessions") <= ticks:
            assert time.monotonic() < deadline, "beat's ticks never came back"
            time.sleep(0.5)
        assert worker.process.poll() is None
    finally:
        producer.close()
        kill_worker(worker)
        for node in lost:
            if node.process is None or node.process.poll() is not None:
                node.start()
                node.wait_up()
    assert refused >= 1, "no publish was refused without a majority"
    assert len(final) == len(accepted)
    print(f"\nlost majority: {refused} publishes refused within the bound, {len(accepted)} served")
