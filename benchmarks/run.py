"""Run the benchmarks and write ``benchmarks/results/<name>.json`` and ``<name>.md``.

    python -m benchmarks.run                   # everything, 3 times (make bench), writes latest.*
    python -m benchmarks.run --only P1,P3 --quick --repeat 1   # a subset, smaller; partial.*

Each benchmark is a module with ``NAME``, ``TITLE``, ``run(ctx) -> dict`` and optionally
``skip_reason() -> str | None``; add one by listing it in ``BENCHMARKS``. The benchmarks run
``--repeat`` times, in rounds (P1…P6, then again), so a burst of load elsewhere on the machine
spoils one repetition of each rather than every repetition of one; the report gives medians
with the min-max (``benchmarks.aggregate``). Whatever happens (an error, Ctrl-C, SIGTERM), the
databases, vhosts and processes a benchmark made are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import harness
from benchmarks.aggregate import fold
from benchmarks.harness import (
    BenchContext,
    install_signal_handlers,
    loadavg,
    log,
    machine_info,
    sweep_stale,
)
from benchmarks.report import write_report

BENCHMARKS = (
    "benchmarks.p1_throughput",
    "benchmarks.p1q_queue_types",
    "benchmarks.p2_concurrency",
    "benchmarks.p3_latency",
    "benchmarks.p4_reaper",
    "benchmarks.p5_admission",
    "benchmarks.webhooks_isolation",
    "benchmarks.pa_accounts",
    "benchmarks.pt_tenants",
)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _met(target: dict[str, Any]) -> dict[str, Any]:
    """Adds ``met`` and ``miss_by`` (how far from the target, relative) to a target entry."""
    value, goal, op = target.get("value"), target["target"], target["op"]
    if not isinstance(value, int | float) or math.isnan(value):
        return {**target, "met": False, "miss_by": None}
    met = value >= goal if op == ">=" else value <= goal
    if met:
        miss = 0.0
    elif op == ">=":
        miss = (goal - value) / goal
    else:
        miss = (value - goal) / goal
    return {**target, "met": met, "miss_by": round(miss, 3)}


def _infrastructure(error: str) -> bool:
    """Errors that mean RabbitMQ or Postgres was stopped under us (by someone else's test)."""
    markers = (
        "BrokerOutage",
        "rabbitmqctl",
        "Connection reset",
        "ConnectionRefused",
        "OperationalError",
        "Connection refused",
        "RecoverableConnectionError",
        "AMQP",
    )
    return any(m in error for m in markers)


def _load(modules: tuple[str, ...]) -> list[ModuleType]:
    return [importlib.import_module(name) for name in modules]


def skip_reason(module: ModuleType) -> str | None:
    skip = getattr(module, "skip_reason", None)
    reason: str | None = skip() if skip is not None else None
    return reason


def run_one(module: ModuleType, ctx_args: dict[str, Any], deadline: float) -> dict[str, Any]:
    """One repetition of one benchmark (tried once more if a server went away under it)."""
    began = time.monotonic()
    load_before = loadavg()
    result: dict[str, Any] = {}
    for attempt in (1, 2):
        try:
            with contextlib.ExitStack() as stack:
                result = module.run(BenchContext(stack=stack, **ctx_args))
            break
        except Exception as error:  # the stack has cleaned up by now
            log(f"{module.NAME}: FAILED: {error!r}")
            result = {
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            }
        spent = time.monotonic() - began
        if attempt == 1 and _infrastructure(result["error"]) and began + 2 * spent < deadline:
            log(f"{module.NAME}: the broker or database went away; trying once more")
            result_first = result["error"]
            continue
        break
    if attempt == 2:
        result.setdefault("notes", []).insert(
            0, f"Second attempt: the first failed because a server went away ({result_first})."
        )
    result["loadavg_before_after"] = [load_before, loadavg()]
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["title"] = module.TITLE
    result["seconds"] = round(time.monotonic() - began, 1)
    result["targets"] = [_met(t) for t in result.get("targets", [])]
    which = f"{ctx_args.get('repetition', 1)}/{ctx_args.get('repetitions', 1)}"
    log(f"{module.NAME} ({which}): done in {result['seconds']} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("--only", help="comma-separated names, e.g. P1,P3")
    parser.add_argument("--quick", action="store_true", help="smaller, faster variants")
    parser.add_argument(
        "--out", help="results name (default: latest, or partial with --only/--quick)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="record each orchestrator worker with py-spy"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=15.0,
        help="minutes per repetition: a benchmark spoiled by a broker outage is re-run only"
        " within this",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only these benchmarks in the existing results file (e.g. re-run one that"
        " a broker outage spoiled)",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (logs)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="repetitions of each benchmark; the report gives medians and min-max (default 3)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    install_signal_handlers()
    if args.profile:
        harness.PY_SPY = shutil.which("py-spy") or shutil.which("py-spy", path="/tmp/prof/bin")
        if harness.PY_SPY is None:
            parser.error("--profile needs py-spy on PATH (pip install py-spy)")
    modules = _load(BENCHMARKS)
    if args.only:
        wanted = {n.strip().upper() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {m.NAME for m in modules}
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        modules = [m for m in modules if m.NAME in wanted]
    out = args.out or ("partial" if (args.only or args.quick) and not args.merge else "latest")

    stale = sweep_stale()
    if stale:
        log(f"removed leftovers of a killed run: {', '.join(stale)}")
    machine = machine_info()
    log(f"machine: {machine['nproc']} x {machine['cpu_model']}, {machine['memory_gib']} GiB")
    work_dir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    results: dict[str, Any] = {}
    skipped = {m.NAME: reason for m in modules if (reason := skip_reason(m))}
    for name, reason in skipped.items():
        log(f"{name}: skipped ({reason})")
    runs: dict[str, list[dict[str, Any]]] = {m.NAME: [] for m in modules if m.NAME not in skipped}
    try:
        for repetition in range(1, args.repeat + 1):
            deadline = time.monotonic() + args.budget * 60
            log(f"repetition {repetition} of {args.repeat}")
            for module in modules:
                if module.NAME in skipped:
                    continue
                ctx_args = {
                    "work_dir": work_dir / f"{module.NAME}-{repetition}",
                    "results_dir": RESULTS_DIR,
                    "quick": args.quick,
                    "repetition": repetition,
                    "repetitions": args.repeat,
                }
                runs[module.NAME].append(run_one(module, ctx_args, deadline))
        for module in modules:
            if module.NAME in skipped:
                results[module.NAME] = {"title": module.TITLE, "skipped": skipped[module.NAME]}
            else:
                folded = fold(runs[module.NAME])
                folded["targets"] = [_met(t) for t in folded.get("targets", [])]
                first = runs[module.NAME][0]
                results[module.NAME] = {
                    "title": module.TITLE,
                    "date": first["date"],
                    "loadavg_before_after": [
                        first["loadavg_before_after"][0],
                        runs[module.NAME][-1]["loadavg_before_after"][1],
                    ],
                    **folded,
                }
    except KeyboardInterrupt:
        log("interrupted: cleaned up; no report written")
        return 130
    finally:
        if args.keep_work:
            log(f"scratch kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    document = {
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "repetitions": args.repeat,
        "machine": machine,
        "total_seconds": round(time.monotonic() - began, 1),
        "benchmarks": results,
    }
    json_path = RESULTS_DIR / f"{out}.json"
    if args.merge and json_path.exists():
        previous = json.loads(json_path.read_text())
        previous["benchmarks"].update(results)
        previous["benchmarks"] = dict(sorted(previous["benchmarks"].items()))
        previous.setdefault("merged", []).append(
            {"command": document["command"], "date": machine["date"], "replaced": list(results)}
        )
        document = previous
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    md_path = write_report(document, RESULTS_DIR, out)
    log(f"wrote {json_path} and {md_path} in {document['total_seconds']} s")
    failed = [name for name, r in results.items() if any("error" in x for x in r.get("runs", []))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
