"""Seeded fault schedules on real processes (tests/chaos/runner.py), checked by the shared
invariants (tests/invariants.py).

- In CI: the fixed seeds of :data:`CI_SEEDS`, one short schedule each.
- ``make chaos SEED=n``: replays one schedule (``CHAOS_SEED``).
- ``make chaos``: random seeds for ``CHAOS_MINUTES``, then a short report
  (``CHAOS_DIR/report.md``): schedules, faults, checks, violations.

A failure names the seed, the replay command and the history file.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.simulator import SimulatorServer
from tests import invariants as inv
from tests.chaos import runner
from tests.chaos.schedule import generate

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.faults,
    pytest.mark.broker,
    pytest.mark.postgres,
    pytest.mark.worker,
]

# Each covers a different mix of faults (see docs/reliability.md, "The generator").
CI_SEEDS = (22, 112, 7)
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
) -> Callable[[int], runner.Result]:
    def run(seed: int) -> runner.Result:
        schedule = generate(seed)

        def settings(name: str, **overrides: object) -> Settings:
            return fault_settings(
                name,
                max_concurrent_sessions=schedule.cap,
                start_timeout_seconds=10.0,
                **overrides,
            )

        workdir = tmp_path / f"seed-{seed}"
        workdir.mkdir()
        return runner.run(
            schedule,
            settings=settings,
            database_url=database_url,
            broker_url=broker_url,
            db=db,
            sim=simulator,
            workdir=workdir,
        )

    return run


@pytest.mark.skipif(bool(REPLAY or MINUTES), reason="make chaos runs its own seeds")
@pytest.mark.parametrize("seed", CI_SEEDS)
def test_a_fault_schedule_breaks_no_promise(
    seed: int, chaos_run: Callable[[int], runner.Result]
) -> None:
    result = chaos_run(seed)
    assert not result.violations, result.describe()


@pytest.mark.skipif(not REPLAY, reason="CHAOS_SEED not set (make chaos SEED=…)")
def test_replay_one_seed(chaos_run: Callable[[int], runner.Result]) -> None:
    assert REPLAY is not None
    result = chaos_run(int(REPLAY))
    assert not result.violations, result.describe()


@pytest.mark.skipif(not MINUTES or bool(REPLAY), reason="CHAOS_MINUTES not set (make chaos)")
@pytest.mark.timeout(0)
def test_random_schedules_for_a_time_budget(chaos_run: Callable[[int], runner.Result]) -> None:
    ends = time.monotonic() + MINUTES * 60
    results: list[runner.Result] = []
    while time.monotonic() < ends:
        results.append(chaos_run(random.SystemRandom().randrange(1, 10**9)))
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
