"""P5 admission: cap 10, 500 queued sessions of 5 s each, reaper interval 1 s.

All starts are enqueued at once; admission lets 10 run and the rest wait. Each session ends by
``max_duration_seconds`` (the reaper), which frees a slot for the next. From the rows:

- cap: the most sessions holding a slot at once (``start_sent_at`` → ``ended_at``), and the
  simulator's peak of active vendor sessions (its own limit is also 10, so an excess shows as
  rejected starts too);
- admission gap: the j-th slot freed (``ended_at``, in order) → the (cap+j)-th start sent to
  the vendor (``start_sent_at``, in order);
- slot utilisation: the sessions' paid-for time (``start_sent_at`` → ``expires_at``) over
  cap x the time the queue was non-empty; the rest is reaper lag (``expires_at`` →
  ``ended_at``) and admission gap, reported separately. Baseline: the ideal makespan,
  sessions x duration / cap.

Runs only once the code has admission control (``admit`` in ``orchestrator/lifecycle/``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from benchmarks.common import (
    make_producer,
    publish_starts,
    row_times,
    status_counts,
    wait_settled,
)
from benchmarks.harness import BenchContext, log, orchestrator_env, start_orchestrator_worker
from benchmarks.stats import summary_ms

NAME = "P5"
TITLE = "Admission: cap 10, queued sessions of 5 s, reaper interval 1 s"
CAP = 10
DURATION = 5
INTERVAL = 1.0
TARGET_GAP_P99_MS = 200.0
TARGET_UTILISATION = 0.85


def skip_reason() -> str | None:
    lifecycle_dir = Path(__file__).resolve().parent.parent / "orchestrator" / "lifecycle"
    for path in lifecycle_dir.glob("*.py"):
        if "def admit" in path.read_text():
            return None
    return "needs admission control (no admit function in orchestrator/lifecycle/)"


class LiveSampler:
    """Polls the database's live count (starting + active + stopping) every 100 ms."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            counts = status_counts(self._url)
            live = sum(counts.get(s, 0) for s in ("starting", "active", "stopping"))
            self.peak = max(self.peak, live)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    live = peak = 0
    for _, step in edges:
        live += step
        peak = max(peak, live)
    return peak


def run(ctx: BenchContext) -> dict[str, Any]:
    count = 60 if ctx.quick else 500
    broker_url = ctx.vhost("p5")
    database_url = ctx.database("p5")
    sim = ctx.simulator(max_concurrent_sessions=CAP, idle_timeout_seconds=None)
    env = orchestrator_env(
        state_dir=ctx.scratch("p5-state"),
        database_url=database_url,
        broker_url=broker_url,
        simulator_url=sim.base_url,
        max_concurrent_sessions=CAP,
        reaper_interval_seconds=INTERVAL,
    )
    worker = ctx.managed(
        start_orchestrator_worker(ctx.scratch("p5"), env, concurrency=64, beat=True)
    )
    producer = make_producer(database_url, broker_url)
    sampler = LiveSampler(database_url)
    log(f"P5: {count} sessions of {DURATION} s, cap {CAP} (ideal {count * DURATION / CAP:g} s)")
    try:
        publish_starts(producer, "p5", count, max_duration_seconds=DURATION)
        ideal = count * DURATION / CAP
        wait_settled(
            database_url, count, ideal * 3 + 60, settled=("ended", "failed"), alive=worker.alive
        )
    finally:
        sampler.stop()
        producer.close()
    vendor = sim.stats()
    worker.stop()
    rows = [r for r in row_times(database_url) if r.request_id.startswith("p5-")]
    failed = [r for r in rows if r.status == "failed"]
    # (start sent, expires, ended) of every session that ran, as epoch seconds
    ok = [
        (r.start_sent_at.timestamp(), r.expires_at.timestamp(), r.ended_at.timestamp())
        for r in rows
        if r.start_sent_at and r.expires_at and r.ended_at
    ]
    sent = sorted(s for s, _, _ in ok)
    ended = sorted(e for _, _, e in ok)
    gaps = [max(0.0, sent[CAP + j] - ended[j]) for j in range(len(sent) - CAP)]
    # Slots freed after every request had its row (the start queue held no new requests then)
    all_claimed = max(r.created_at.timestamp() for r in rows if r.created_at)
    late_gaps = [
        max(0.0, sent[CAP + j] - ended[j]) for j in range(len(sent) - CAP) if ended[j] > all_claimed
    ]
    t_begin, t_end = sent[0], sent[-1]
    window = t_end - t_begin
    paid = sum(max(0.0, min(x, t_end) - max(s, t_begin)) for s, x, _ in ok)
    lag = sum(max(0.0, min(e, t_end) - max(x, t_begin)) for _, x, e in ok)
    capacity = CAP * window
    utilisation = paid / capacity if capacity else float("nan")
    overlap = _max_overlap([(s, e) for s, _, e in ok])
    reaper_lag = [e - x for _, x, e in ok]
    makespan = ended[-1] - sent[0]
    rejected = sum(
        n for code, n in vendor["endpoints"]["start"]["statuses"].items() if code.startswith("4")
    )
    peak = max(overlap, sampler.peak, int(vendor["sessions"]["max_active"]))
    gap = summary_ms(gaps)
    return {
        "sessions": count,
        "cap": CAP,
        "duration_s": DURATION,
        "failed": len(failed),
        "failed_codes": sorted({str(r.status) for r in failed}),
        "peak_slots_rows": overlap,
        "peak_live_sampled": sampler.peak,
        "peak_vendor_active": vendor["sessions"]["max_active"],
        "vendor_rejected_starts": rejected,
        "admission_gap": gap,
        "admission_gap_after_all_claimed": summary_ms(late_gaps),
        "all_claimed_after_s": round(all_claimed - sent[0], 1),
        "reaper_lag": summary_ms(reaper_lag),
        "utilisation": round(utilisation, 3),
        "reaper_lag_share": round(lag / capacity, 3) if capacity else None,
        "makespan_s": round(makespan, 1),
        "baseline_ideal_makespan_s": ideal,
        "notes": [
            f"{count} sessions, {len(failed)} failed; makespan {makespan:.1f} s against the ideal"
            f" {ideal:g} s ({ideal / makespan:.2f}x). Reaper lag (expiry → ended) p50"
            f" {summary_ms(reaper_lag)['p50_ms']} / p99 {summary_ms(reaper_lag)['p99_ms']} ms"
            f" takes {lag / capacity:.1%} of the slot time; vendor start rejections {rejected}.",
        ],
        "targets": [
            {
                "name": "peak sessions holding a slot",
                "value": peak,
                "unit": "",
                "op": "<=",
                "target": CAP,
                "detail": (
                    f"rows {overlap}, sampled live {sampler.peak}, vendor active"
                    f" {vendor['sessions']['max_active']}, vendor rejections {rejected}"
                ),
            },
            {
                "name": "admission gap p99",
                "value": gap["p99_ms"],
                "unit": "ms",
                "op": "<=",
                "target": TARGET_GAP_P99_MS,
                "detail": (
                    f"slot freed → next start sent; p50 {gap['p50_ms']} ms; once every request"
                    f" had its row ({all_claimed - sent[0]:.0f} s in): p50"
                    f" {summary_ms(late_gaps)['p50_ms']} / p99 {summary_ms(late_gaps)['p99_ms']} ms"
                ),
            },
            {
                "name": "slot utilisation",
                "value": round(utilisation, 3),
                "unit": "",
                "op": ">=",
                "target": TARGET_UTILISATION,
                "detail": (
                    f"reaper lag {lag / capacity:.1%} of slot time; makespan {makespan:.0f} s vs"
                    f" ideal {ideal:g} s"
                ),
            },
        ],
    }
