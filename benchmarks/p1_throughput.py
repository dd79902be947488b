"""P1 throughput: sustained starts/s (enqueue → ``active`` row committed) with a zero-latency
simulator, beside a bare Celery no-op task on the same broker with the same worker settings.

Both queues are filled before their worker starts, so each worker runs flat out and the
publisher (in this process) neither limits nor competes with it; the rate is taken between
the 10th and 90th percentile of completion times (ramp-up and drain left out). Completion is
the row's ``started_at`` (set in the transaction that makes it ``active``) for ours, the
``task_postrun`` time for the no-op.
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
    wait_settled,
)
from benchmarks.harness import (
    BenchContext,
    cpu_busy_fraction,
    cpu_seconds,
    log,
    orchestrator_env,
    python_env,
    start_bare_worker,
    start_orchestrator_worker,
    wait_for,
)
from benchmarks.stats import ratio, steady_rate

NAME = "P1"
TITLE = "Throughput: end-to-end starts/s vs a bare Celery no-op"
CONCURRENCY = 64  # the worker command's default
TARGET_RATIO = 0.5


def _bare(ctx: BenchContext, broker_url: str, count: int) -> dict[str, Any]:
    app = bare_app.make_app(broker_url)
    with Connection(broker_url) as conn:
        bare_app.QUEUE.bind(conn.default_channel).declare()
    began = time.perf_counter()
    for _ in range(count):
        app.send_task("bench.noop", kwargs={"avatar_id": "x"})
    publish_rate = count / (time.perf_counter() - began)
    app.close()
    done_file = ctx.work_dir / "bare-done.json"
    done_file.unlink(missing_ok=True)
    busy = cpu_busy_fraction()
    worker = ctx.managed(
        start_bare_worker(
            ctx.scratch("p1"),
            broker_url,
            concurrency=CONCURRENCY,
            expected=count,
            done_file=done_file,
        )
    )
    cpu0 = cpu_seconds(worker.pid)
    wait_for(
        lambda: done_file.exists() or not worker.alive(), 300, "bare no-op tasks", interval=0.2
    )
    if not done_file.exists():
        raise RuntimeError(f"bare worker died:\n{worker.log_tail()}")
    cpu = cpu_seconds(worker.pid) - cpu0
    machine_busy = busy()
    worker.stop()
    times: list[float] = json.loads(done_file.read_text())
    return {
        "tasks": count,
        "rate_per_s": round(steady_rate(times), 1),
        "publish_rate_per_s": round(publish_rate, 1),
        "worker_cpu_ms_per_task": round(cpu * 1000 / count, 3),
        "machine_cpu_busy": round(machine_busy, 3),
        "worker_peak_rss_mib": round(worker.peak_rss / 2**20, 1),
    }


def _ours(ctx: BenchContext, database_url: str, broker_url: str, count: int) -> dict[str, Any]:
    sim = ctx.simulator(max_concurrent_sessions=10_000_000, idle_timeout_seconds=None)
    producer = make_producer(database_url, broker_url)
    try:
        _, publish_rate = publish_starts(producer, "p1", count)
    finally:
        producer.close()
    env = orchestrator_env(
        state_dir=ctx.scratch("p1-state"),
        database_url=database_url,
        broker_url=broker_url,
        simulator_url=sim.base_url,
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
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.seqcost", database_url, sim.base_url, "200"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=python_env({}),
    )
    sequential: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "starts": count,
        "statuses": counts,
        "rate_per_s": round(steady_rate(started), 1),
        "publish_rate_per_s": round(publish_rate, 1),
        "worker_cpu_ms_per_start": round(cpu * 1000 / count, 3),
        "machine_cpu_busy": round(machine_busy, 3),
        "worker_peak_rss_mib": round(worker.peak_rss / 2**20, 1),
        "vendor_start_calls": vendor_stats["calls"],
        "postgres_waits": pg_waits,
        "sequential_in_process": sequential,
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    count = 500 if ctx.quick else 1200
    bare_count = 2000 if ctx.quick else 4000
    broker_url = ctx.vhost("p1")
    database_url = ctx.database("p1")
    log(f"P1: bare Celery no-op, {bare_count} tasks, threads x{CONCURRENCY}")
    bare = _bare(ctx, broker_url, bare_count)
    log(f"P1: bare {bare['rate_per_s']}/s; now {count} starts through the orchestrator")
    ours = _ours(ctx, database_url, broker_url, count)
    value = ours["rate_per_s"]
    rel = ratio(value, bare["rate_per_s"])
    log(f"P1: orchestrator {value}/s = {rel}x bare")
    seq = ours["sequential_in_process"]
    columns = ["", "rate /s", "publish /s", "worker CPU ms per task", "machine CPU busy", "RSS MiB"]
    rows = [
        [
            "orchestrator start_session",
            ours["rate_per_s"],
            ours["publish_rate_per_s"],
            ours["worker_cpu_ms_per_start"],
            ours["machine_cpu_busy"],
            ours["worker_peak_rss_mib"],
        ],
        [
            "baseline: bare Celery no-op",
            bare["rate_per_s"],
            bare["publish_rate_per_s"],
            bare["worker_cpu_ms_per_task"],
            bare["machine_cpu_busy"],
            bare["worker_peak_rss_mib"],
        ],
    ]
    return {
        "notes": [
            f"Queue pre-filled ({count} starts, {bare_count} no-ops), then one worker, threads"
            f" x{CONCURRENCY}, acks_late, prefetch multiplier 1, JSON, log level WARNING; rate"
            " between the 10th and 90th percentile of completion times. Zero-latency simulator."
        ],
        "tables": [
            {"title": "Throughput", "columns": columns, "rows": rows},
            {
                "title": (
                    "The start path alone, uncontended (benchmarks/seqcost.py: one thread, no"
                    " Celery, 200 starts in a row)"
                ),
                "columns": ["wall ms", "CPU ms", "SQL statements", "commits", "CPU-bound ceiling"],
                "rows": [
                    [
                        seq["wall_ms_per_start"],
                        seq["cpu_ms_per_start"],
                        seq["statements_per_start"],
                        seq["commits_per_start"],
                        f"{1000 / seq['cpu_ms_per_start']:.0f} starts/s per worker process",
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
        },
        "orchestrator": ours,
        "baseline_bare_celery": bare,
        "targets": [
            {
                "name": "starts/s vs bare Celery no-op",
                "value": rel,
                "unit": "x bare",
                "op": ">=",
                "target": TARGET_RATIO,
                "detail": f"{value} starts/s vs {bare['rate_per_s']} no-op tasks/s",
            }
        ],
    }
