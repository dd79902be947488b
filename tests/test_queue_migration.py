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
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from kombu import Connection

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
from orchestrator.producer import Producer
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
