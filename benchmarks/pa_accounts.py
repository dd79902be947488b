"""PA accounts: 60 simulated accounts of cap 100 against one account of cap 6,000.

Both pools hold 6,000 slots; each figure of the 60-account pool is reported as a ratio to the
one-account pool measured in the same repetition (this machine cannot show more processes
scaling, so there are no absolute scaling claims).

- **Admission decisions** (in process, no vendor): 8 threads call ``store.admission.claim``
  until 5,100 requests hold a slot; each call is one admission decision (the claim's one
  statement: locks, the choice of account, the row and the counters). p50/p99 of the calls,
  decisions/s (each thread's first 5 calls, which open its connection, untimed), and the
  mean number of backends waiting on a lock (``pg_stat_activity``
  sampled every 50 ms, wait event type ``Lock``). The same calls give the **claim latency at
  100 and at 5,000 live sessions** (the calls made while 50-150, and 4,950-5,050, rows were
  live): the counters are O(1) to read, so the two should match.
  The 60-account pool is measured twice: requests naming no account (routing chooses) and
  requests each naming one (round robin), which lock only their own account's row.
- **End to end** (a worker, ``--concurrency 64`` with beat, reaper interval 1 s; the simulator
  answering every call after 200 ms): 6,000 starts published at once, each with
  ``max_duration_seconds`` drawn uniformly from [90, 120] s (seeded), so the expiries are
  spread uniformly over a 30 s window after each session's start and fall while thousands
  are live. Sustained starts/s (``started_at`` between the 10th and 90th percentile) and
  reaper lag (``expires_at`` → ``ended_at``) p50/p99, with the live count at each expiry.

``--quick``: 1,200 end-to-end sessions of [30, 45] s; the in-process part is the same.
"""

from __future__ import annotations

import bisect
import json
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PgWaitSampler,
    claim_request,
    make_producer,
    row_times,
    start_kwargs,
    wait_settled,
)
from benchmarks.harness import BenchContext, log, orchestrator_env, start_orchestrator_worker
from benchmarks.stats import percentile, ratio, steady_rate, summary_ms
from orchestrator.db import Database
from orchestrator.store.accounts import CatalogEntry, sync_catalog
from orchestrator.store.admission import claim

NAME = "PA"
TITLE = "Accounts: 60 accounts of cap 100 against one of cap 6,000, 200 ms vendor latency"
ACCOUNTS = 60
CAP = 100
LATENCY = 0.2
CLAIM_THREADS = 8
CLAIMED = 5_100
WARMUP = 5  # untimed claims per thread first
POOLS = {"one": [("solo", ACCOUNTS * CAP)], "sixty": [(f"acct-{i:02d}", CAP) for i in range(60)]}


def _claim_phase(ctx: BenchContext, pool: str, *, named: bool = False) -> dict[str, Any]:
    """In-process admission decisions until CLAIMED rows hold a slot; ``named``: each
    request names an account (round robin), as a start that asks for one does."""
    url = ctx.database(f"p6c{pool}{'n' if named else ''}")
    names = [n for n, _ in POOLS[pool]]
    db = Database(url, pool_size=CLAIM_THREADS + 2)
    sync_catalog(db, [CatalogEntry(n, cap, 1.0, {}) for n, cap in POOLS[pool]])
    lock = threading.Lock()
    done: list[tuple[int, float]] = []  # (live rows when the call began, seconds)
    counter = iter(range(CLAIMED))

    def worker() -> None:
        calls = 0
        while True:
            with lock:
                i = next(counter, None)
                live = len(done)
            if i is None:
                return
            rid = f"p6-{pool}-{i:06d}-{uuid.uuid4().hex[:6]}"
            request = claim_request(rid, account=names[i % len(names)] if named else None)
            began = time.perf_counter()
            found = claim(db, request, lease_seconds=3600)
            took = time.perf_counter() - began
            if found.status != "starting":
                raise RuntimeError(f"claim {i} on {pool}: {found.status}, not starting")
            calls += 1
            with lock:
                # A thread's first calls open its connection and plan the claim in that
                # backend: they hold a slot (counted live) but are not timed.
                done.append((live, took if calls > WARMUP else -1.0))

    sampler = PgWaitSampler(url)
    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(CLAIM_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    sampler.stop()
    db.dispose()
    samples = max(1, sampler.samples)
    waiting = sum(n for what, n in sampler.counts.items() if what.startswith("Lock")) / samples
    timed = [(live, s) for live, s in done if s >= 0]
    took = [s for _, s in timed]
    return {
        "decisions": summary_ms(took),
        "decisions_per_s": round(len(took) / elapsed, 1),
        "lock_waiting_backends": round(waiting, 3),
        "pg_waits": sampler.summary(),
        "at_100_live": summary_ms([s for live, s in timed if 50 <= live <= 150]),
        "at_5000_live": summary_ms([s for live, s in timed if 4950 <= live <= 5050]),
    }


def _accounts_dir(folder: Path, pool: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, cap in POOLS[pool]:
        keys = {"app_id": f"app-{name}", "user_key": f"key-{name}", "cap": cap}
        (folder / f"{name}.json").write_text(json.dumps(keys))
    return folder


def _live_at(started: list[float], ended: list[float], x: float) -> int:
    return bisect.bisect_right(started, x) - bisect.bisect_right(ended, x)


def _end_to_end(ctx: BenchContext, pool: str, count: int, low: int, high: int) -> dict[str, Any]:
    broker_url = ctx.vhost(f"p6{pool}")
    database_url = ctx.database(f"p6{pool}")
    accounts = [
        {"name": n, "app_id": f"app-{n}", "user_key": f"key-{n}", "max_concurrent_sessions": c}
        for n, c in POOLS[pool]
    ]
    sim = ctx.simulator(accounts=accounts, latency_seconds=LATENCY, idle_timeout_seconds=None)
    env = orchestrator_env(
        state_dir=ctx.scratch(f"p6-{pool}-state"),
        database_url=database_url,
        broker_url=broker_url,
        simulator_url=sim.base_url,
        accounts_dir=_accounts_dir(ctx.scratch(f"p6-{pool}-accounts"), pool),
        reaper_interval_seconds=1.0,
    )
    for key in ("ORCHESTRATOR_DEEPBRAIN_APP_ID", "ORCHESTRATOR_DEEPBRAIN_USER_KEY"):
        env.pop(key)  # only the accounts of the folder
    worker = ctx.managed(
        start_orchestrator_worker(ctx.scratch(f"p6-{pool}"), env, concurrency=64, beat=True)
    )
    producer = make_producer(database_url, broker_url)
    rng = random.Random(6)
    try:
        for i in range(count):
            duration = rng.randint(low, high)
            producer.enqueue_start_session(**start_kwargs("p6", i, max_duration_seconds=duration))
        wait_settled(
            database_url, count, high * 4 + 300, settled=("ended", "failed"), alive=worker.alive
        )
    finally:
        producer.close()
    worker.stop()
    rows = [r for r in row_times(database_url) if r.request_id.startswith("p6-")]
    ran = [r for r in rows if r.started_at and r.expires_at and r.ended_at]
    started = sorted(r.started_at.timestamp() for r in ran if r.started_at)
    ended = sorted(r.ended_at.timestamp() for r in ran if r.ended_at)
    lags = [r.ended_at.timestamp() - r.expires_at.timestamp() for r in ran]  # type: ignore[union-attr]
    live = [_live_at(started, ended, r.expires_at.timestamp()) for r in ran]  # type: ignore[union-attr]
    return {
        "sessions": count,
        "failed": len(rows) - len(ran),
        "starts_per_s": round(steady_rate(started), 1),
        "reaper_lag": summary_ms(lags),
        "live_at_expiry_max": max(live, default=0),
        "live_at_expiry_p50": percentile([float(n) for n in live], 50),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    count, low, high = (1_200, 30, 45) if ctx.quick else (6_000, 90, 120)
    measured: dict[str, dict[str, Any]] = {}
    order = ("one", "sixty") if ctx.repetition % 2 else ("sixty", "one")
    for pool in order:
        log(f"PA: {pool}: {CLAIMED} admission decisions in process")
        measured[pool] = {"claims": _claim_phase(ctx, pool)}
        if pool == "sixty":
            measured[pool]["named_claims"] = _claim_phase(ctx, pool, named=True)
        log(f"PA: {pool}: {count} sessions end to end, durations {low}-{high} s")
        measured[pool]["e2e"] = _end_to_end(ctx, pool, count, low, high)
    one, sixty = measured["one"], measured["sixty"]

    def figure(name: str, unit: str, value: float, base: float, detail: str) -> dict[str, Any]:
        return {
            "name": name,
            "value": value,
            "unit": unit,
            "baseline": base,
            "baseline_name": "one account of cap 6,000",
            "ratio": ratio(value, base),
            "detail": detail,
        }

    c1, c60, e1, e60 = one["claims"], sixty["claims"], one["e2e"], sixty["e2e"]
    n60 = sixty["named_claims"]
    figures = [
        figure(
            "sustained starts/s, 60 accounts",
            "/s",
            e60["starts_per_s"],
            e1["starts_per_s"],
            f"{count} starts, 200 ms vendor latency, worker with 64 threads",
        ),
        figure(
            "admission decision p50, 60 accounts",
            "ms",
            c60["decisions"]["p50_ms"],
            c1["decisions"]["p50_ms"],
            f"{CLAIM_THREADS} threads calling claim()",
        ),
        figure(
            "admission decision p99, 60 accounts",
            "ms",
            c60["decisions"]["p99_ms"],
            c1["decisions"]["p99_ms"],
            f"{CLAIM_THREADS} threads calling claim()",
        ),
        figure(
            "mean backends waiting on admission locks, 60 accounts",
            "",
            c60["lock_waiting_backends"],
            c1["lock_waiting_backends"],
            "pg_stat_activity every 50 ms, wait_event_type Lock",
        ),
        figure(
            "admission decisions/s, 60 accounts, each claim naming its account",
            "/s",
            n60["decisions_per_s"],
            c1["decisions_per_s"],
            f"p50 {n60['decisions']['p50_ms']} / p99 {n60['decisions']['p99_ms']} ms; unnamed"
            f" claims on 60 accounts: {c60['decisions_per_s']}/s",
        ),
        figure(
            "mean backends waiting on admission locks, 60 accounts, claims naming their account",
            "",
            n60["lock_waiting_backends"],
            c1["lock_waiting_backends"],
            "an unnamed claim locks every eligible account's row (in name order) to choose one",
        ),
        figure(
            "reaper lag p50, 60 accounts",
            "ms",
            e60["reaper_lag"]["p50_ms"],
            e1["reaper_lag"]["p50_ms"],
            f"up to {e60['live_at_expiry_max']} live at an expiry",
        ),
        figure(
            "reaper lag p99, 60 accounts",
            "ms",
            e60["reaper_lag"]["p99_ms"],
            e1["reaper_lag"]["p99_ms"],
            "reaper interval 1 s",
        ),
        figure(
            "claim p50 at 5,000 live (60 accounts)",
            "ms",
            c60["at_5000_live"]["p50_ms"],
            c60["at_100_live"]["p50_ms"],
            "baseline: the same run's claims at 100 live",
        ),
        figure(
            "claim p50 at 5,000 live (one account)",
            "ms",
            c1["at_5000_live"]["p50_ms"],
            c1["at_100_live"]["p50_ms"],
            "baseline: the same run's claims at 100 live",
        ),
    ]
    for f in figures[-2:]:
        f["baseline_name"] = "100 live"
    return {
        "pools": measured,
        "figures": figures,
        "notes": [
            f"Expiries: durations uniform in [{low}, {high}] s from each start (seeded), so each"
            f" session expires in a {high - low} s window after its start.",
        ],
    }
