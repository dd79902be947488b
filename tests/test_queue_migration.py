"""Upgrading a deployment whose broker has the classic queues of earlier releases to quorum
queues (docs/operations.md, "Moving to quorum queues"): a worker of the new release refuses
the old queues with one line saying what to do; ``orchestrator queues migrate`` moves them,
queued jobs and dead letters included; every queued job is then served.

Each test gets a vhost of its own on the suite's RabbitMQ (classic queues must not meet the
run's quorum ones).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kombu import Connection
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    calculate_routing_key,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from orchestrator.cli import main
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.messaging import (
    CONTROL_QUEUE,
    DEAD_LETTER_QUEUE,
    START_QUEUE,
    Topology,
    dead_letter_exchange,
)
from orchestrator.producer import Producer, PublishError
from orchestrator.queue_migration import migrate
from orchestrator.simulator import SimulatorServer
from tests.conftest import AMQP_HOST, WorkerProcess, settings_env
from tests.faults.conftest import wait_settled

pytestmark = [pytest.mark.broker, pytest.mark.postgres, pytest.mark.worker]

QUEUED = 8  # below the admission cap (10) and the simulator's limit


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


@pytest.fixture
def old_vhost() -> Iterator[str]:
    vhost = f"orch_migrate_{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def queue_types(url: str) -> dict[str, str]:
    vhost = url.rsplit("/", 1)[1]
    found = json.loads(
        rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--formatter", "json")
    )
    return {str(q["name"]): str(q["type"]) for q in found}


def depth(url: str, queue: str) -> int:
    with Connection(url) as conn:
        _, count, _ = conn.channel().queue_declare(queue, passive=True)
        return int(count)


def run_cli(settings: Settings, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=settings_env(settings))
    return result.exit_code, result.output


def test_classic_queues_with_queued_jobs_move_to_quorum_and_every_job_is_served(
    settings_for: Callable[..., Settings],
    old_vhost: str,
    db: Database,
    simulator: SimulatorServer,
    tmp_path: Path,
) -> None:
    old = settings_for(broker_url=old_vhost, queue_type="classic", orphan_grace_seconds=5.0)
    new = settings_for(broker_url=old_vhost, state_dir=tmp_path / "new", orphan_grace_seconds=5.0)

    # The earlier release's broker: classic queues, direct exchanges, jobs waiting, and a dead
    # letter with its x-death headers.
    producer = Producer(old)
    queued = [
        producer.enqueue_start_session(avatar_id="a", request_id=f"old-{n}") for n in range(QUEUED)
    ]
    producer.request_stop(request_id="old-0")  # on the control queue: runs after its start
    producer.close()
    with Connection(old_vhost) as conn:
        conn.Producer().publish(
            b"not json",
            exchange=dead_letter_exchange,
            content_type="text/plain",
            headers={"x-death": [{"reason": "rejected", "queue": START_QUEUE, "count": 1}]},
            delivery_mode=2,
        )
    assert queue_types(old_vhost) == dict.fromkeys(
        (START_QUEUE, CONTROL_QUEUE, DEAD_LETTER_QUEUE), "classic"
    )

    # The new release's worker refuses the old queues with one line naming the way out.
    refused = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "worker"],
        env=settings_env(new),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 1, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert "orchestrator queues migrate" in last and "Traceback" not in refused.stderr, last
    assert "ORCHESTRATOR_QUEUE_TYPE=quorum" in last

    # Consumers attached: the migration refuses and changes nothing.
    with Connection(old_vhost) as conn:
        channel = conn.channel()
        channel.basic_consume(START_QUEUE, callback=lambda *_: None)
        code, out = run_cli(new, "queues", "migrate")
        assert code == 1 and "stop every worker first" in out, out
    assert depth(old_vhost, START_QUEUE) == QUEUED

    code, out = run_cli(new, "queues", "migrate")
    assert code == 0, out
    assert f"{START_QUEUE}: redeclared as quorum, {QUEUED} messages moved" in out
    assert f"{DEAD_LETTER_QUEUE}: redeclared as quorum, 1 messages moved" in out
    assert queue_types(old_vhost) == dict.fromkeys(
        (START_QUEUE, CONTROL_QUEUE, DEAD_LETTER_QUEUE), "quorum"
    )
    assert (depth(old_vhost, START_QUEUE), depth(old_vhost, CONTROL_QUEUE)) == (QUEUED, 1)
    code, again = run_cli(new, "queues", "migrate")  # a second run changes nothing
    assert code == 0 and again.count("already as asked (quorum)") == 3, again

    with Connection(old_vhost) as conn:
        dead = conn.channel().basic_get(DEAD_LETTER_QUEUE, no_ack=True)
    assert dead is not None and dead.body == b"not json"
    assert dead.headers["x-death"][0]["reason"] == "rejected"

    worker = WorkerProcess(new, tmp_path / "worker.log")
    try:
        rows = wait_settled(db, queued, timeout=60)
    finally:
        worker.stop()
    assert rows["old-0"].status == "ended" and rows["old-0"].end_reason == "USER_CLOSED"
    assert all(rows[rid].status == "active" for rid in queued[1:])
    assert "Connected to amqp" in worker.log()
    assert depth(old_vhost, START_QUEUE) == 0


def test_the_topology_of_each_type(settings_for: Callable[..., Settings]) -> None:
    """Quorum: a delivery limit, at-least-once dead-lettering, topic exchanges; classic: the
    arguments of earlier releases, unchanged; the embedded broker: always classic."""
    quorum = Topology("quorum", 7).work_queue(START_QUEUE)
    assert quorum.exchange.type == "topic"
    assert quorum.queue_arguments == {
        "x-dead-letter-exchange": "orchestrator.dlx",
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    classic = Topology("classic").work_queue(START_QUEUE)
    assert classic.exchange.type == "direct"
    assert classic.queue_arguments == {"x-dead-letter-exchange": "orchestrator.dlx"}
    assert settings_for(broker_url="").effective_queue_type == "classic"
    assert Topology("quorum").retry_countdown(0.3) == 1.0
    assert Topology("quorum").retry_countdown(0.0) == 0.0
    assert Topology("classic").retry_countdown(0.3) == 0.3


def test_queues_migrate_on_the_embedded_broker_is_one_line(
    settings_for: Callable[..., Settings],
) -> None:
    code, out = run_cli(settings_for(broker_url=""), "queues", "migrate")
    assert (
        code == 1 and out.strip() == "Error: only a RabbitMQ broker (amqp://) has queues to migrate"
    )


def start_ids(url: str, queue: str) -> list[str]:
    """The request ids of the start messages in ``queue`` (taken off it)."""
    found = []
    with Connection(url) as conn:
        channel: Any = conn.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            _, kwargs, _ = json.loads(message.body)
            found.append(str(kwargs["request_id"]))
    return found


class Enqueuer(threading.Thread):
    """A producer publishing starts with confirms as fast as it can: ``accepted`` is what the
    broker confirmed (the producer returned), ``refused`` what raised PublishError."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.producer = Producer(settings)
        self.accepted: list[str] = []
        self.refused = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        number = 0
        while not self.stopping.is_set():
            rid = f"during-{number:05d}"
            number += 1
            try:
                self.accepted.append(
                    self.producer.enqueue_start_session(request_id=rid, avatar_id="a")
                )
            except PublishError:
                self.refused += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)
        self.producer.close()


# The steps of one queue's migration, in order, as its progress lines say them.
STEPS = (
    "new messages go to",
    "messages moved to",
    "is now topic",
    "bound to it again",
    "declared as asked and bound",
    "messages moved back",
)


class Killed(BaseException):
    """The migration dies right after a step (raised from its progress callback)."""


def migrate_killed_after_step(url: str, first: int) -> int | None:
    """Run the migration (to quorum) and let it die right after the first step of
    ``orchestrator.start`` numbered ``first`` or later: its connection is dropped without a
    goodbye (unacknowledged messages go back to their queue), as when the process is
    SIGKILLed. Returns the step it died after, or None if it finished."""
    died: list[int] = []

    def progress(line: str) -> None:
        if not line.startswith(f"{START_QUEUE}:"):
            return
        for number, step in enumerate(STEPS):
            if number >= first and step in line:
                died.append(number)
                raise Killed(line)

    connection = Connection(url)
    try:
        migrate(connection, Topology("quorum"), progress)
    except Killed:
        connection.collect()
        return died[0]
    connection.close()
    return None


def test_a_migration_killed_after_each_step_loses_no_confirmed_start(
    settings_for: Callable[..., Settings], old_vhost: str, tmp_path: Path
) -> None:
    """A producer publishes starts with confirms all through ``queues migrate`` (classic to
    quorum), the migration dying after each of its steps in turn, a second apart, and run
    again: every start the broker confirmed is in the start queue at the end, and no holding
    queue is left. (Between a step and the next run the broker has a half-migrated shape:
    an exchange without bindings, a queue gone, messages in the holding queue.)"""
    old = settings_for(broker_url=old_vhost, queue_type="classic", publish_timeout_seconds=3.0)
    new = settings_for(broker_url=old_vhost, state_dir=tmp_path / "new")
    with Connection(old_vhost) as conn:
        Topology("classic").declare(conn)
    enqueuer = Enqueuer(old)
    enqueuer.start()
    died: list[int] = []
    try:
        while len(enqueuer.accepted) < 20:
            time.sleep(0.05)
        while (
            step := migrate_killed_after_step(old_vhost, died[-1] + 1 if died else 0)
        ) is not None:
            died.append(step)
            time.sleep(1.0)  # publishes meet the half-migrated broker
        code, out = run_cli(new, "queues", "migrate")
        assert code == 0 and out.count("already as asked (quorum)") == 3, out
    finally:
        enqueuer.stop()
    assert died[:3] == [0, 1, 2], died  # among them: the exchange without a binding
    types = queue_types(old_vhost)
    assert types.get(START_QUEUE) == "quorum", types
    assert not [name for name in types if name.endswith(".migrating")], types
    found = set(start_ids(old_vhost, START_QUEUE))
    lost = [rid for rid in enqueuer.accepted if rid not in found]
    assert not lost, f"{len(lost)} of {len(enqueuer.accepted)} confirmed starts lost: {lost[:5]}"
    print(
        f"\nmigration died after steps {died}: {len(enqueuer.accepted)} starts confirmed, all in"
        f" {START_QUEUE}; {enqueuer.refused} refused (PublishError)"
    )


def test_countdown_retries_waiting_in_the_broker_survive_a_move_to_classic(
    settings_for: Callable[..., Settings], old_vhost: str
) -> None:
    """A quorum worker's countdown retry waits in Celery's delay queues and comes back
    through ``celery_delayed_delivery``; moving the queues to classic must keep that way in."""
    quorum = Topology("quorum")
    with Connection(old_vhost) as conn:
        quorum.declare(conn)
        declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
        bind_queue_to_native_delayed_delivery_exchange(conn, quorum.work_queue(START_QUEUE))
        conn.Producer().publish(
            b'[[], {"request_id": "delayed"}, {}]',
            exchange="celery_delayed_27",
            routing_key=calculate_routing_key(4, START_QUEUE),
            content_type="application/json",
            delivery_mode=2,
        )
    code, out = run_cli(
        settings_for(broker_url=old_vhost, queue_type="classic"), "queues", "migrate"
    )
    assert code == 0, out
    assert queue_types(old_vhost)[START_QUEUE] == "classic"
    deadline = time.monotonic() + 20
    found: list[str] = []
    while not found and time.monotonic() < deadline:
        found = start_ids(old_vhost, START_QUEUE)
        time.sleep(0.5)
    assert found == ["delayed"], "the countdown retry never came back to its queue"
