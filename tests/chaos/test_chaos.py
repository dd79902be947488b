"""Seeded fault schedules on real processes (tests/chaos/runner.py), checked by the shared
invariants (tests/invariants.py).

- In CI: the fixed seeds of :data:`CI_SEEDS`, one short schedule each.
- ``make chaos SEED=n``: replays one schedule (``CHAOS_SEED``).
- ``make chaos``: random seeds for ``CHAOS_MINUTES``, then a short report
  (``CHAOS_DIR/report.md``): schedules, faults, checks, violations.

A failure names the seed, the replay command and the history file.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.db.migrate import upgrade
from orchestrator.simulator import SimulatorServer
from tests import invariants as inv
from tests.chaos import runner
from tests.chaos.schedule import generate, parse_seed
from tests.faults.crashable_postgres import CrashablePostgres

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


@pytest.fixture
def chaos_run(
    fault_settings: Callable[..., Settings],
    database_url: str,
    broker_url: str,
    db: Database,
    simulator: SimulatorServer,
    tmp_path: Path,
    clean_queues: None,
) -> Callable[[str], runner.Result]:
    """Run the schedule of a seed ("42", or "c42" for one with a Postgres crash: the service's
    database is then a server of the run's own)."""

    def run(seed_text: str) -> runner.Result:
        seed, crash = parse_seed(seed_text)
        schedule = generate(seed, crash=crash)
        workdir = tmp_path / f"seed-{seed_text}"
        workdir.mkdir()
        with contextlib.ExitStack() as stack:
            url, database, crashable = database_url, db, None
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
                broker_url=broker_url,
                db=database,
                sim=simulator,
                workdir=workdir,
                crashable=crashable,
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
        crash = len(results) % 3 == 2  # every third schedule crashes Postgres too
        results.append(chaos_run(f"c{seed}" if crash else str(seed)))
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
