"""P2 concurrency: 1 s simulated vendor latency on start; starts/s and vendor starts in flight
on one worker host, for a few pool/concurrency configurations.

Each configuration gets an empty database, a reset simulator and a start queue kept full by a
feeder thread; it is measured over a fixed window after a warm-up, so a slow configuration
costs no more time than a fast one. The rate and the in-flight figures (mean and p95 of the
simulator's in-flight count, sampled every 0.2 s) come from the same window; the peak, which
includes the warm-up burst (every thread takes a message at once), is shown apart as a peak.
The targets are judged on one process of 256 threads (``TARGETED``), the same configuration in
every repetition. Baselines in the same run: the ideal (concurrency ÷
latency), Celery's own ceiling (a bare task that sleeps 1 s on the same pool and concurrency),
and the vendor-call ceiling without Celery or the database (``benchmarks.clientload``: the
worker's httpx client shared by N threads, one httpx client per thread, and aiohttp).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from kombu import Connection

from benchmarks import bare_app
from benchmarks.common import (
    Feeder,
    PgWaitSampler,
    declare_orchestrator_topology,
    make_producer,
    purge,
    row_times,
    start_publisher,
    truncate,
)
from benchmarks.harness import (
    BenchContext,
    Simulator,
    cpu_busy_fraction,
    cpu_seconds,
    log,
    orchestrator_env,
    start_bare_worker,
    start_orchestrator_worker,
)
from benchmarks.report import try_plot
from benchmarks.stats import percentile

NAME = "P2"
TITLE = "Concurrency: 1 s vendor latency, starts/s and in-flight on one worker host"
LATENCY = 1.0
TARGET_IN_FLIGHT = 200
TARGET_RATE = 160.0


@dataclass(frozen=True)
class Config:
    pool: str
    concurrency: int
    processes: int = 1

    @property
    def label(self) -> str:
        procs = f"{self.processes} x " if self.processes > 1 else ""
        return f"{procs}{self.pool} x{self.concurrency}"

    @property
    def slots(self) -> int:
        return self.concurrency * self.processes


CEILING_LABELS = {
    "httpx-threads": "one DeepBrainClient shared by the threads (as in the worker)",
    "httpx-client-per-thread": "a DeepBrainClient per thread",
    "aiohttp": "aiohttp, asyncio tasks",
}
TARGETED = Config("threads", 256)
FULL = (TARGETED, Config("threads", 64), Config("threads", 128, 2))
QUICK = (TARGETED,)
SAMPLE_EVERY = 0.2


class InFlightSampler:
    """Polls the simulator's in-flight start count every ``SAMPLE_EVERY`` seconds."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            try:
                stats = self._sim.stats()["endpoints"]["start"]
            except Exception:
                continue
            self.samples.append((time.monotonic() - self._t0, int(stats["in_flight"])))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _measure_config(
    ctx: BenchContext,
    config: Config,
    sim: Simulator,
    database_url: str,
    broker_url: str,
    warm: float,
    window: float,
) -> dict[str, Any]:
    truncate(database_url)
    sim.reset()
    declare_orchestrator_topology(broker_url)
    purge(broker_url, "orchestrator.start", "orchestrator.control")
    producer = make_producer(database_url, broker_url)
    feeder = Feeder(
        broker_url,
        "orchestrator.start",
        start_publisher(producer, f"p2-{config.concurrency}"),
        keep=int(config.slots * 1.5),
    )
    workers = []
    try:
        feeder.start()
        for i in range(config.processes):
            env = orchestrator_env(
                state_dir=ctx.scratch(f"p2-state-{config.concurrency}-{i}"),
                database_url=database_url,
                broker_url=broker_url,
                simulator_url=sim.base_url,
            )
            workers.append(
                ctx.managed(
                    start_orchestrator_worker(
                        ctx.scratch("p2"),
                        env,
                        pool=config.pool,
                        concurrency=config.concurrency,
                        name=f"worker-{config.pool}{config.concurrency}-{i}",
                    )
                )
            )
        sampler = InFlightSampler(sim)
        t0 = time.time()
        time.sleep(warm)
        cpu0 = sum(cpu_seconds(w.pid) for w in workers)
        waits = PgWaitSampler(database_url)
        busy = cpu_busy_fraction()
        time.sleep(window)
        machine_busy = busy()
        pg_waits = waits.stop()
        cpu = sum(cpu_seconds(w.pid) for w in workers) - cpu0
        sampler.stop()
        vendor = sim.stats()["endpoints"]["start"]
        dead = [w.name for w in workers if not w.alive()]
    finally:
        feeder.stop()
        for w in workers:
            w.stop()
        producer.close()
    purge(broker_url, "orchestrator.start", "orchestrator.control")
    if dead:
        raise RuntimeError(f"worker(s) died: {dead}")
    lo, hi = t0 + warm, t0 + warm + window
    rows = row_times(database_url)
    started = [r for r in rows if r.started_at and lo <= r.started_at.timestamp() <= hi]
    failed = [r for r in rows if r.status == "failed"]
    # The sampler's clock starts when it does, just before t0.
    in_window = [n for t, n in sampler.samples if warm <= t <= warm + window]
    rate = len(started) / window
    return {
        "config": config.label,
        "slots": config.slots,
        "starts_per_s": round(rate, 1),
        "ideal_per_s": config.slots / LATENCY,
        "ratio_to_ideal": round(rate / (config.slots / LATENCY), 3),
        "mean_in_flight": round(sum(in_window) / len(in_window), 1) if in_window else None,
        "p95_in_flight": round(percentile(in_window, 95), 1) if in_window else None,
        "in_flight_samples": len(in_window),
        "peak_in_flight_with_warmup": int(vendor["max_in_flight"]),
        "failed_rows": len(failed),
        "vendor_statuses": vendor["statuses"],
        "worker_cpu_percent": round(100 * cpu / window, 1),
        "machine_cpu_busy": round(machine_busy, 3),
        "worker_peak_rss_mib": round(sum(w.peak_rss for w in workers) / 2**20, 1),
        "in_flight_series": sampler.samples,
        "postgres_waits": pg_waits,
    }


def _bare_sleep(
    ctx: BenchContext, broker_url: str, concurrency: int, warm: float, window: float
) -> dict[str, Any]:
    app = bare_app.make_app(broker_url)
    with Connection(broker_url) as conn:
        bare_app.QUEUE.bind(conn.default_channel).declare()

    def publish(n: int) -> None:
        for _ in range(n):
            app.send_task("bench.sleep", kwargs={"seconds": LATENCY})

    done_file = ctx.work_dir / f"bare-sleep-{concurrency}.json"
    done_file.unlink(missing_ok=True)
    feeder = Feeder(broker_url, "bench.bare", publish, keep=int(concurrency * 1.5)).start()
    try:
        worker = ctx.managed(
            start_bare_worker(
                ctx.scratch("p2"),
                broker_url,
                concurrency=concurrency,
                expected=10**9,
                done_file=done_file,
            )
        )
        t0 = time.time()
        time.sleep(warm + window)
    finally:
        feeder.stop()
    worker.stop()
    app.close()
    purge(broker_url, "bench.bare")
    times: list[float] = json.loads(done_file.read_text()) if done_file.exists() else []
    lo, hi = t0 + warm, t0 + warm + window
    rate = len([t for t in times if lo <= t <= hi]) / window
    return {
        "baseline": f"bare Celery sleep({LATENCY:g} s), threads x{concurrency}",
        "rate_per_s": round(rate, 1),
        "worker_peak_rss_mib": round(worker.peak_rss / 2**20, 1),
    }


def _client_ceiling(mode: str, concurrency: int, seconds: float, sim: Simulator) -> dict[str, Any]:
    sim.reset()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.clientload",
            mode,
            str(concurrency),
            str(seconds),
            sim.base_url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak_in_flight"] = sim.stats()["endpoints"]["start"]["max_in_flight"]
    return result


def run(ctx: BenchContext) -> dict[str, Any]:
    configs = QUICK if ctx.quick else FULL
    warm, window = (4.0, 8.0) if ctx.quick else (5.0, 15.0)
    broker_url = ctx.vhost("p2")
    database_url = ctx.database("p2")
    sim = ctx.simulator(
        max_concurrent_sessions=10_000_000,
        idle_timeout_seconds=None,
        endpoint_latency={"start": LATENCY},
    )
    measured = []
    for config in configs:
        log(f"P2: {config.label}, warm-up {warm:g} s, window {window:g} s")
        result = _measure_config(ctx, config, sim, database_url, broker_url, warm, window)
        log(
            f"P2: {config.label}: {result['starts_per_s']} starts/s, in flight: mean"
            f" {result['mean_in_flight']}, p95 {result['p95_in_flight']}"
        )
        measured.append(result)
    log("P2: baselines (bare Celery sleep, vendor-call ceilings)")
    bare = _bare_sleep(ctx, broker_url, 256, 3.0, 8.0)
    ceilings = [
        _client_ceiling(mode, 256, 6.0, sim)
        for mode in ("httpx-threads", "httpx-client-per-thread", "aiohttp")
    ]
    best = next(r for r in measured if r["config"] == TARGETED.label)
    plots = []
    plot_path = ctx.results_dir / "p2_in_flight.png"
    series = {
        r["config"]: ([t for t, _ in r["in_flight_series"]], [n for _, n in r["in_flight_series"]])
        for r in measured
    }
    if try_plot(
        plot_path,
        series,
        title=(
            "P2: vendor starts in flight (simulator), 1 s start latency"
            + (f"; repetition {ctx.repetition} of {ctx.repetitions}" if ctx.repetitions > 1 else "")
        ),
        xlabel="seconds since the worker was ready",
        ylabel="starts in flight",
        hlines={"target 200": TARGET_IN_FLIGHT},
        vspans={"measured window": (warm, warm + window)},
    ):
        plots.append(plot_path.name)
    rows = [
        [
            r["config"],
            r["starts_per_s"],
            r["ideal_per_s"],
            r["ratio_to_ideal"],
            r["mean_in_flight"],
            r["p95_in_flight"],
            r["peak_in_flight_with_warmup"],
            r["worker_cpu_percent"],
            r.get("machine_cpu_busy"),
            r["worker_peak_rss_mib"],
            r["failed_rows"],
        ]
        for r in measured
    ]
    rows.append(
        [
            bare["baseline"],
            bare["rate_per_s"],
            256,
            round(bare["rate_per_s"] / 256, 3),
            "",
            "",
            "",
            "",
            "",
            bare["worker_peak_rss_mib"],
            "",
        ]
    )
    rows += [
        [
            f"vendor calls only: {CEILING_LABELS[c['mode']]} x{c['concurrency']}",
            c["rate_per_s"],
            c["concurrency"],
            round(c["rate_per_s"] / c["concurrency"], 3),
            "",
            "",
            c["peak_in_flight"],
            f"{c['cpu_ms_per_call']} ms CPU/call",
            "",
            "",
            "",
        ]
        for c in ceilings
    ]
    for r in measured:
        r.pop("in_flight_series")
    return {
        "latency_s": LATENCY,
        "warmup_s": warm,
        "window_s": window,
        "configs": measured,
        "baseline_bare_celery_sleep": bare,
        "baseline_vendor_call_ceilings": ceilings,
        "tables": [
            {
                "title": "Configurations and same-run baselines",
                "columns": [
                    "configuration",
                    "starts/s",
                    "ideal/s",
                    "ratio",
                    "in flight: mean over the window",
                    "p95",
                    "peak (incl. warm-up)",
                    "worker CPU %",
                    "machine CPU busy",
                    "RSS MiB",
                    "failed",
                ],
                "rows": rows,
            },
            {
                "title": "Postgres during each window: mean backends per state",
                "columns": ["configuration: state / wait event", "mean backends"],
                "rows": [
                    [f"{r['config']}: {state}", n]
                    for r in measured
                    for state, n in r["postgres_waits"]["mean_backends"].items()
                ],
            },
        ],
        "plots": plots,
        "notes": [
            f"Warm-up {warm:g} s, then the window of {window:g} s over which the rate and the"
            f" in-flight mean and p95 are taken (the simulator's in-flight count, sampled every"
            f" {SAMPLE_EVERY:g} s); the peak includes the warm-up burst. Targets judged on"
            f" {TARGETED.label}."
        ],
        "targets": [
            {
                "name": "vendor starts in flight, mean over the window",
                "value": best["mean_in_flight"],
                "unit": "",
                "op": ">=",
                "target": TARGET_IN_FLIGHT,
                "detail": (
                    f"{best['config']}: p95 {best['p95_in_flight']}, peak"
                    f" {best['peak_in_flight_with_warmup']} (incl. warm-up)"
                ),
            },
            {
                "name": "starts/s at 1 s latency",
                "value": best["starts_per_s"],
                "unit": "/s",
                "op": ">=",
                "target": TARGET_RATE,
                "detail": (
                    f"{best['config']}: {best['ratio_to_ideal']}x its ideal, machine CPU"
                    f" {best['machine_cpu_busy']} busy; bare Celery sleep {bare['rate_per_s']}/s"
                ),
            },
        ],
        "figures": [
            {
                "name": "worker RSS, peak",
                "value": best["worker_peak_rss_mib"],
                "unit": "MiB",
                "baseline": bare["worker_peak_rss_mib"],
                "baseline_name": "bare Celery worker, threads x256",
                "detail": f"{best['config']}, {best['mean_in_flight']} starts in flight (mean)",
            }
        ],
    }
