"""P1 throughput: sustained starts/s (enqueue → ``active`` row committed) with a zero-latency
simulator, beside two bare Celery tasks on the same broker with the same worker settings,
measured in the same repetition:

- the honest baseline, ``bench.io``: the same I/O by hand (insert the row, call the vendor,
  update the row, publish the event) on the same database and simulator, with none of our
  guarantees (``benchmarks/bare_app.py``);
- the floor, ``bench.noop``: Celery and the broker alone.

Each queue is filled before its worker starts, so each worker runs flat out and the publisher
(in this process) neither limits nor competes with it. Two rates for each: between the 10th
and 90th percentile of completion times (ramp-up and drain left out), and over the whole drain
(worker ready → last completion). Completion is the row's ``started_at`` (set in the
transaction that makes it ``active``) for ours, the ``task_postrun`` time for the bare tasks.
The I/O baseline and ours run back to back, in alternating order from one repetition to the
next, on an emptied table and a reset simulator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from kombu import Connection

from benchmarks import bare_app
from benchmarks.common import (
    PgWaitSampler,
    make_producer,
    publish_starts,
    row_times,
    start_kwargs,
    status_counts,
    truncate,
    wait_settled,
)
from benchmarks.harness import (
    APP_ID,
    USER_KEY,
    BenchContext,
    Simulator,
    cpu_busy_fraction,
    cpu_seconds,
    log,
    orchestrator_env,
    plain_conninfo,
    python_env,
    start_bare_worker,
    start_orchestrator_worker,
    wait_for,
)
from benchmarks.stats import drain_rate, ratio, steady_rate

NAME = "P1"
TITLE = "Throughput: end-to-end starts/s vs bare Celery tasks (the same I/O by hand; a no-op)"
CONCURRENCY = 64  # the worker command's default
TARGET_RATIO = 0.5


def _bare(
    ctx: BenchContext,
    broker_url: str,
    task: str,
    messages: list[dict[str, Any]],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Publish ``messages`` to ``task``, then drain them with one bare worker."""
    count = len(messages)
    app = bare_app.make_app(broker_url)
    with Connection(broker_url) as conn:
        bare_app.QUEUE.bind(conn.default_channel).declare()
    began = time.perf_counter()
    for kwargs in messages:
        app.send_task(task, kwargs=kwargs)
    publish_rate = count / (time.perf_counter() - began)
    app.close()
    done_file = ctx.work_dir / f"{task}-done.json"
    done_file.unlink(missing_ok=True)
    busy = cpu_busy_fraction()
    worker = ctx.managed(
        start_bare_worker(
            ctx.scratch("p1"),
            broker_url,
            concurrency=CONCURRENCY,
            expected=count,
            done_file=done_file,
            env=env,
        )
    )
    cpu0 = cpu_seconds(worker.pid)
    wait_for(lambda: done_file.exists() or not worker.alive(), 600, task, interval=0.2)
    if not done_file.exists():
        raise RuntimeError(f"bare worker died:\n{worker.log_tail()}")
    cpu = cpu_seconds(worker.pid) - cpu0
    machine_busy = busy()
    worker.stop()
    times: list[float] = json.loads(done_file.read_text())
    return {
        "tasks": count,
        "rate_per_s": round(steady_rate(times), 1),
        "drain_rate_per_s": round(drain_rate(times, worker.ready_at), 1),
        "publish_rate_per_s": round(publish_rate, 1),
        "worker_cpu_ms_per_task": round(cpu * 1000 / count, 3),
        "machine_cpu_busy": round(machine_busy, 3),
        "worker_peak_rss_mib": round(worker.peak_rss / 2**20, 1),
    }


def _bare_io(
    ctx: BenchContext, database_url: str, broker_url: str, sim: Simulator, count: int
) -> dict[str, Any]:
    env = {
        "BENCH_DATABASE_URL": plain_conninfo(database_url),
        "BENCH_VENDOR_URL": sim.base_url,
        "BENCH_APP_ID": APP_ID,
        "BENCH_USER_KEY": USER_KEY,
    }
    messages = [start_kwargs("p1-io", i) for i in range(count)]
    result = _bare(ctx, broker_url, "bench.io", messages, env)
    result["statuses"] = status_counts(database_url)
    if result["statuses"].get("active", 0) != count:
        raise RuntimeError(f"bare I/O task: {result['statuses']} rows, expected {count} active")
    result["vendor_start_calls"] = sim.stats()["endpoints"]["start"]["calls"]
    return result


def _ours(
    ctx: BenchContext,
    database_url: str,
    broker_url: str,
    sim: Simulator,
    count: int,
    queue_type: str = "quorum",
) -> dict[str, Any]:
    producer = make_producer(database_url, broker_url, queue_type=queue_type)
    try:
        _, publish_rate = publish_starts(producer, "p1", count)
    finally:
        producer.close()
    env = orchestrator_env(
        state_dir=ctx.scratch("p1-state"),
        database_url=database_url,
        broker_url=broker_url,
        simulator_url=sim.base_url,
        queue_type=queue_type,
    )
    busy = cpu_busy_fraction()
    worker = ctx.managed(start_orchestrator_worker(ctx.scratch("p1"), env, concurrency=CONCURRENCY))
    cpu0 = cpu_seconds(worker.pid)
    waits = PgWaitSampler(database_url)
    try:
        counts = wait_settled(database_url, count, 600, alive=worker.alive)
    finally:
        pg_waits = waits.stop()
    cpu = cpu_seconds(worker.pid) - cpu0
    machine_busy = busy()
    worker.stop()
    rows = row_times(database_url)
    started = [r.started_at.timestamp() for r in rows if r.started_at is not None]
    vendor_stats = sim.stats()["endpoints"]["start"]
    return {
        "starts": count,
        "statuses": counts,
        "rate_per_s": round(steady_rate(started), 1),
        "drain_rate_per_s": round(drain_rate(started, worker.ready_at), 1),
        "publish_rate_per_s": round(publish_rate, 1),
        "worker_cpu_ms_per_start": round(cpu * 1000 / count, 3),
        "machine_cpu_busy": round(machine_busy, 3),
        "worker_peak_rss_mib": round(worker.peak_rss / 2**20, 1),
        "vendor_start_calls": vendor_stats["calls"],
        "postgres_waits": pg_waits,
        "queue_type": queue_type,
    }


def measure_ours(
    ctx: BenchContext,
    database_url: str,
    broker_url: str,
    sim: Simulator,
    count: int,
    queue_type: str,
) -> dict[str, Any]:
    """P1's measurement of the orchestrator alone, on queues of ``queue_type`` (P1Q)."""
    return _ours(ctx, database_url, broker_url, sim, count, queue_type)


def _sequential(database_url: str, sim: Simulator) -> dict[str, Any]:
    """``benchmarks.seqcost``: the start path alone, uncontended, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.seqcost", database_url, sim.base_url, "200"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=python_env({}),
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _row(label: str, r: dict[str, Any]) -> list[Any]:
    cpu_key = "worker_cpu_ms_per_start" if "starts" in r else "worker_cpu_ms_per_task"
    return [
        label,
        r.get("starts", r.get("tasks")),
        r["rate_per_s"],
        r["drain_rate_per_s"],
        r["publish_rate_per_s"],
        r[cpu_key],
        r["machine_cpu_busy"],
        r["worker_peak_rss_mib"],
    ]


def run(ctx: BenchContext) -> dict[str, Any]:
    count = 500 if ctx.quick else 1200
    noop_count = 2000 if ctx.quick else 4000
    broker_url = ctx.vhost("p1")
    database_url = ctx.database("p1")
    sim = ctx.simulator(max_concurrent_sessions=10_000_000, idle_timeout_seconds=None)
    log(f"P1: bare Celery no-op, {noop_count} tasks, threads x{CONCURRENCY}")
    noop = _bare(ctx, broker_url, "bench.noop", [{"avatar_id": "x"}] * noop_count)
    log(f"P1: no-op {noop['rate_per_s']}/s")
    order = ("io", "ours") if ctx.repetition % 2 else ("ours", "io")
    measured: dict[str, dict[str, Any]] = {}
    for which in order:
        truncate(database_url)
        sim.reset()
        if which == "io":
            log(f"P1: bare Celery task doing the same I/O by hand, {count} tasks")
            measured[which] = _bare_io(ctx, database_url, broker_url, sim, count)
        else:
            log(f"P1: {count} starts through the orchestrator")
            measured[which] = _ours(ctx, database_url, broker_url, sim, count)
        log(f"P1: {which} {measured[which]['rate_per_s']}/s")
    io, ours = measured["io"], measured["ours"]
    seq = _sequential(database_url, sim)
    ours["sequential_in_process"] = seq
    value = ours["rate_per_s"]
    rel_noop = ratio(value, noop["rate_per_s"])
    rel_io = ratio(value, io["rate_per_s"])
    log(f"P1: orchestrator = {rel_io}x the bare I/O task, {rel_noop}x the no-op")
    columns = [
        "",
        "tasks",
        "rate /s, 10th-90th pct of completions",
        "rate /s, whole drain",
        "publish /s",
        "worker CPU ms per task",
        "machine CPU busy",
        "RSS MiB",
    ]
    rows = [
        _row("orchestrator start_session", ours),
        _row("baseline: bare Celery task, the same I/O by hand", io),
        _row("baseline: bare Celery no-op", noop),
    ]
    ratios = [
        [
            "÷ bare Celery task, the same I/O by hand",
            rel_io,
            ratio(ours["drain_rate_per_s"], io["drain_rate_per_s"]),
        ],
        [
            "÷ bare Celery no-op",
            rel_noop,
            ratio(ours["drain_rate_per_s"], noop["drain_rate_per_s"]),
        ],
    ]
    return {
        "notes": [
            f"Queues pre-filled ({count} starts, {count} I/O tasks, {noop_count} no-ops), then"
            f" one worker each, threads x{CONCURRENCY}, acks_late, prefetch multiplier 1, JSON,"
            " publisher confirms, log level WARNING; zero-latency simulator. Rates between the"
            " 10th and 90th percentile of completion times, and over the whole drain (worker"
            " ready → last completion). The I/O task inserts the row (its commit, like our"
            " claim's, does not wait for the WAL flush), calls the simulator's start with"
            " httpx, marks the row active and publishes `session.active` (persistent, confirmed)"
            " inline; no admission, idempotency, outbox, retries, validation or tracing. It and"
            " the orchestrator run back to back (the I/O task first in odd repetitions)."
        ],
        "tables": [
            {"title": "Throughput", "columns": columns, "rows": rows},
            {
                "title": "Orchestrator ÷ baseline, taken within each repetition",
                "columns": ["", "10th-90th pct", "whole drain"],
                "rows": ratios,
            },
            {
                "title": (
                    "The start path alone, uncontended (benchmarks/seqcost.py: one thread, no"
                    " Celery, 200 starts in a row)"
                ),
                "columns": [
                    "wall ms",
                    "CPU ms",
                    "SQL statements",
                    "commits",
                    "CPU-bound ceiling, starts/s per worker process",
                ],
                "rows": [
                    [
                        seq["wall_ms_per_start"],
                        seq["cpu_ms_per_start"],
                        seq["statements_per_start"],
                        seq["commits_per_start"],
                        round(1000 / seq["cpu_ms_per_start"]),
                    ]
                ],
            },
            {
                "title": (
                    "Postgres during the orchestrator run: mean backends per state"
                    f" ({ours['postgres_waits']['samples']} samples of pg_stat_activity)"
                ),
                "columns": ["state / wait event", "mean backends"],
                "rows": [[k, v] for k, v in ours["postgres_waits"]["mean_backends"].items()],
            },
        ],
        "settings": {
            "pool": "threads",
            "concurrency": CONCURRENCY,
            "acks_late": True,
            "prefetch_multiplier": 1,
            "serializer": "json",
            "log_level": "WARNING",
            "simulator_latency_s": 0.0,
            "order": list(order),
        },
        "orchestrator": ours,
        "baseline_bare_io": io,
        "baseline_bare_celery": noop,
        "targets": [
            {
                "name": "starts/s vs bare Celery no-op",
                "value": rel_noop,
                "unit": "x bare",
                "op": ">=",
                "target": TARGET_RATIO,
                "detail": f"{value} starts/s vs {noop['rate_per_s']} no-op tasks/s",
            }
        ],
        "figures": [
            {
                "name": "starts/s vs the same I/O by hand",
                "value": value,
                "unit": "/s",
                "baseline": io["rate_per_s"],
                "baseline_name": "bare Celery task: insert, vendor call, update, publish",
                "detail": (
                    f"whole drain {ours['drain_rate_per_s']} vs {io['drain_rate_per_s']}/s;"
                    f" worker CPU {ours['worker_cpu_ms_per_start']} vs"
                    f" {io['worker_cpu_ms_per_task']} ms per start"
                ),
            }
        ],
    }
