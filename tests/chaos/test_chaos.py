"""Seeded fault schedules on real processes (tests/chaos/runner.py), checked by the shared
invariants (tests/invariants.py).

- In CI: the fixed seeds of :data:`CI_SEEDS`, one short schedule each.
- ``make chaos SEED=n``: replays one schedule (``CHAOS_SEED``); ``c<n>`` with a Postgres
  crash, ``k<n>`` on a three-node RabbitMQ cluster of the run's own with node kills.
- ``make chaos``: random seeds for ``CHAOS_MINUTES``, then a short report
  (``CHAOS_DIR/report.md``): schedules, faults, checks, violations.

A failure names the seed, the replay command and the history file.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.db.migrate import upgrade
from orchestrator.simulator import SimulatorServer
from tests import invariants as inv
from tests.chaos import runner
from tests.chaos.schedule import generate, parse_seed
from tests.chaos.service import ClusterRun
from tests.faults.crashable_postgres import CrashablePostgres
from tests.rabbit_cluster import RabbitCluster, rabbitmqctl

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.faults,
    pytest.mark.broker,
    pytest.mark.postgres,
    pytest.mark.worker,
]

# Between them 12 of the 13 plain fault kinds, and a Postgres crash (docs/reliability.md,
# "The generator").
CI_SEEDS = ("22", "112", "7", "c4")
REPLAY = os.environ.get("CHAOS_SEED")
MINUTES = float(os.environ.get("CHAOS_MINUTES", "0") or 0)


@pytest.fixture(scope="session")
def chaos_cluster() -> Iterator[Callable[[], RabbitCluster]]:
    """The three-node cluster of the cluster schedules, started at the first one (about half
    a minute) and shared by the rest of the session; never the machine's RabbitMQ."""
    started: list[RabbitCluster] = []

    def get() -> RabbitCluster:
        if not started:
            if shutil.which("rabbitmq-server") is None:
                pytest.skip("rabbitmq-server is not installed: no cluster to kill nodes of")
            if os.geteuid() != 0:
                pytest.fail("a cluster schedule starts RabbitMQ nodes as rabbitmq: run as root")
            began = time.monotonic()
            started.append(RabbitCluster().__enter__())
            print(f"chaos: cluster of three up in {time.monotonic() - began:.1f} s", flush=True)
        return started[0]

    yield get
    for cluster in started:
        cluster.close()


@contextlib.contextmanager
def cluster_vhost(cluster: RabbitCluster) -> Iterator[ClusterRun]:
    vhost = f"orch_chaos_{uuid.uuid4().hex[:8]}"
    cluster.add_vhost(vhost)
    try:
        yield ClusterRun(cluster, vhost)
    finally:
        with contextlib.suppress(RuntimeError):
            rabbitmqctl(cluster.running()[0].name, "delete_vhost", vhost)


@pytest.fixture
def chaos_run(
    fault_settings: Callable[..., Settings],
    database_url: str,
    broker_url: str,
    db: Database,
    simulator: SimulatorServer,
    tmp_path: Path,
    clean_queues: None,
    chaos_cluster: Callable[[], RabbitCluster],
) -> Callable[[str], runner.Result]:
    """Run the schedule of a seed ("42"; "c42" with a Postgres crash: the service's database is
    then a server of the run's own; "k42" with node kills: the broker is then a vhost on a
    three-node cluster of the run's own)."""

    def run(seed_text: str) -> runner.Result:
        seed, crash, on_cluster = parse_seed(seed_text)
        schedule = generate(seed, crash=crash, cluster=on_cluster)
        workdir = tmp_path / f"seed-{seed_text}"
        workdir.mkdir()
        with contextlib.ExitStack() as stack:
            url, database, crashable = database_url, db, None
            broker, cluster = broker_url, None
            if on_cluster:
                cluster = stack.enter_context(cluster_vhost(chaos_cluster()))
                broker = cluster.cluster.failover_url(cluster.cluster.nodes[0], cluster.vhost)
            if crash:
                crashable = stack.enter_context(CrashablePostgres())
                upgrade(crashable.url)
                url = crashable.url
                database = Database(url, pool_size=2)
                stack.callback(database.dispose)

            def settings(name: str, **overrides: object) -> Settings:
                values: dict[str, object] = {
                    "database_url": url,
                    "max_concurrent_sessions": schedule.cap,
                    "start_timeout_seconds": 10.0,
                }
                values.update(overrides)
                return fault_settings(name, **values)

            return runner.run(
                schedule,
                settings=settings,
                database_url=url,
                broker_url=broker,
                db=database,
                sim=simulator,
                workdir=workdir,
                crashable=crashable,
                cluster=cluster,
            )

    return run


@pytest.mark.skipif(bool(REPLAY or MINUTES), reason="make chaos runs its own seeds")
@pytest.mark.parametrize("seed", CI_SEEDS)
def test_a_fault_schedule_breaks_no_promise(
    seed: str, chaos_run: Callable[[str], runner.Result]
) -> None:
    result = chaos_run(seed)
    assert not result.violations, result.describe()


@pytest.mark.skipif(not REPLAY, reason="CHAOS_SEED not set (make chaos SEED=…)")
def test_replay_one_seed(chaos_run: Callable[[str], runner.Result]) -> None:
    assert REPLAY is not None
    result = chaos_run(REPLAY)
    assert not result.violations, result.describe()


@pytest.mark.skipif(not MINUTES or bool(REPLAY), reason="CHAOS_MINUTES not set (make chaos)")
@pytest.mark.timeout(0)
def test_random_schedules_for_a_time_budget(chaos_run: Callable[[str], runner.Result]) -> None:
    ends = time.monotonic() + MINUTES * 60
    results: list[runner.Result] = []
    while time.monotonic() < ends:
        seed = random.SystemRandom().randrange(1, 10**9)
        # Every third schedule crashes Postgres too; of the rest, every fourth runs on the
        # three-node cluster and kills its nodes.
        n = len(results)
        prefix = "c" if n % 3 == 2 else "k" if n % 4 == 3 else ""
        results.append(chaos_run(f"{prefix}{seed}"))
        report = write_report(results, MINUTES)
    print(f"chaos: report in {report}")
    failed = [r for r in results if r.violations]
    assert not failed, "\n\n".join(r.describe() for r in failed)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counter.items()))


def write_report(results: list[runner.Result], minutes: float) -> Path:
    faults = Counter(kind for r in results for kind in r.faults)
    found = Counter(v.invariant for r in results for v in r.violations)
    lines = [
        f"# make chaos: {len(results)} schedules in {minutes:g} min budget",
        "",
        f"- faults run: {sum(faults.values())} ({_counts(faults)})",
        f"- starts confirmed: {sum(r.confirmed for r in results)}; vendor duplicates"
        f" (documented crash window): {sum(r.duplicates for r in results)}",
        f"- invariants checked after each schedule: {', '.join(inv.CHECKS)}",
        f"- violations: {sum(found.values())}" + (f" ({_counts(found)})" if found else ""),
        "",
        "| seed | seconds | faults | violations | history |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.seed} | {r.seconds} | {', '.join(r.faults)} | {len(r.violations)} |"
        f" {r.history_path} |"
        for r in results
    ]
    for r in results:
        if r.violations:
            lines += ["", r.describe()]
    path = runner.CHAOS_DIR / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
