"""P4 reaper: expiry → stop lag with many sessions expiring together, and the sweep's cost with
1,000,000 ended rows against 10,000 (same live set).

Lag: N sessions are created at the simulator (its real start API) and inserted as ``active``
rows that all expire at the same instant; a worker with beat inside (reaper interval 1 s)
stops them; lag = ``ended_at`` - ``expires_at`` from the rows. Same-run baseline: sessions
expiring one at a time (the floor that the interval and beat alone give).

Sweep: the real ``store.claim_due_stops`` (and the admission count, if the code has one) timed
on two databases with the same live set and 10,000 or 1,000,000 ended rows, in alternation
(noise falls on both alike); the due rows are put back after every call. The statements the
function sent are captured and run again under ``EXPLAIN (ANALYZE, BUFFERS)`` for the report.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import event

from benchmarks.harness import (
    APP_ID,
    USER_KEY,
    BenchContext,
    log,
    orchestrator_env,
    plain_conninfo,
    start_orchestrator_worker,
    wait_for,
)
from benchmarks.stats import ratio, summary_ms

NAME = "P4"
TITLE = "Reaper: expiry → stop lag, and sweep cost vs table size"
INTERVAL = 1.0
TARGET_RATIO = 1.5
LIVE_FUTURE = 5_000  # active, expiring in an hour
LIVE_DUE = 200  # active, expired: what one sweep claims
STOPPING_DUE = 50  # stopping, retry due


async def _vendor_sessions(base_url: str, count: int) -> list[str]:
    """Start ``count`` sessions at the simulator directly (no orchestrator), 50 at a time."""
    import aiohttp

    async with aiohttp.ClientSession(base_url) as http:
        async with http.post(
            "/api/v2/sessions/token", json={"appId": APP_ID, "userKey": USER_KEY}
        ) as reply:
            token = (await reply.json())["data"]["session_token"]
        headers = {"Authorization": f"Bearer {token}"}
        gate = asyncio.Semaphore(50)

        async def one() -> str:
            async with (
                gate,
                http.post(
                    "/api/v2/sessions/start",
                    json={"avatar_id": "bench-avatar", "max_session_duration": 30},
                    headers=headers,
                ) as r,
            ):
                data = await r.json()
                return str(data["data"]["session_id"])

        return list(await asyncio.gather(*(one() for _ in range(count))))


INSERT_ACTIVE = """
INSERT INTO sessions (id, request_id, claim_id, status, avatar_id, request_payload,
                      payload_sha256, vendor_session_id, livekit_url, livekit_room,
                      created_at, start_sent_at, started_at, expires_at, attempts)
SELECT gen_random_uuid(), %(prefix)s || v.n, 'bench', 'active', 'bench-avatar',
       '{"avatar_id": "bench-avatar"}'::jsonb, md5(v.n::text) || md5(v.n::text), v.vid,
       'wss://livekit.simulator.invalid', 'room-' || v.n,
       now(), now(), now(), %(expires)s, 1
FROM unnest(%(vids)s::text[]) WITH ORDINALITY AS v(vid, n)
"""


def _insert_active(
    conn: psycopg.Connection[Any], prefix: str, vids: list[str], expires: datetime
) -> None:
    conn.execute(INSERT_ACTIVE, {"prefix": prefix, "vids": vids, "expires": expires})


def _lag(ctx: BenchContext, sessions: int) -> dict[str, Any]:
    broker_url = ctx.vhost("p4")
    database_url = ctx.database("p4-lag")
    sim = ctx.simulator(max_concurrent_sessions=10_000_000, idle_timeout_seconds=None)
    env = orchestrator_env(
        state_dir=ctx.scratch("p4-state"),
        database_url=database_url,
        broker_url=broker_url,
        simulator_url=sim.base_url,
        reaper_interval_seconds=INTERVAL,
    )
    worker = ctx.managed(
        start_orchestrator_worker(ctx.scratch("p4"), env, concurrency=64, beat=True)
    )
    singles = 6
    vids = asyncio.run(_vendor_sessions(sim.base_url, sessions + singles))
    conninfo = plain_conninfo(database_url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # Baseline: one session at a time, expiring at staggered offsets within an interval.
        now = datetime.now(UTC)
        for i in range(singles):
            expires = now + timedelta(seconds=2 + i * 1.37)
            _insert_active(conn, f"p4-single-{i}-", [vids[i]], expires)
        wait_for(
            lambda: _ended(conn, "p4-single-%") >= singles or not worker.alive(),
            60,
            "single sessions reaped",
            interval=0.2,
        )
        single_lags = _lags(conn, "p4-single-%")
        # Many expiring together.
        expires = datetime.now(UTC) + timedelta(seconds=3)
        _insert_active(conn, "p4-many-", vids[singles:], expires)
        began = time.monotonic()
        wait_for(
            lambda: _ended(conn, "p4-many-%") >= sessions or not worker.alive(),
            180,
            f"{sessions} sessions reaped",
            interval=0.25,
        )
        took = time.monotonic() - began
        many_lags = _lags(conn, "p4-many-%")
    alive = worker.alive()
    vendor = sim.stats()["endpoints"]["stop"]
    worker.stop()
    if not alive:
        raise RuntimeError(f"worker died:\n{worker.log_tail()}")
    return {
        "sessions": sessions,
        "lag": summary_ms(many_lags),
        "baseline_single_lag": summary_ms(single_lags),
        "all_ended_after_s": round(took, 1),
        "vendor_stop_calls": vendor["calls"],
        "vendor_stop_peak_in_flight": vendor["max_in_flight"],
    }


def _ended(conn: psycopg.Connection[Any], pattern: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM sessions WHERE request_id LIKE %s AND status = 'ended'", (pattern,)
    ).fetchone()
    return int(row[0]) if row else 0


def _lags(conn: psycopg.Connection[Any], pattern: str) -> list[float]:
    rows = conn.execute(
        "SELECT extract(epoch FROM ended_at - expires_at) FROM sessions"
        " WHERE request_id LIKE %s AND status = 'ended'",
        (pattern,),
    ).fetchall()
    return [float(r[0]) for r in rows]


# -- sweep cost --------------------------------------------------------------------------------

INSERT_ENDED = """
INSERT INTO sessions (id, request_id, claim_id, status, avatar_id, request_payload,
                      payload_sha256, vendor_session_id, livekit_url, livekit_room,
                      created_at, start_sent_at, started_at, expires_at, ended_at, end_reason,
                      attempts, max_session_numbers)
SELECT gen_random_uuid(), 'ended-' || g, 'bench', 'ended', 'bench-avatar',
       '{"avatar_id": "bench-avatar", "max_session_duration": 30}'::jsonb,
       md5(g::text) || md5(g::text), 'vendor-ended-' || g,
       'wss://livekit.simulator.invalid', 'room-ended-' || g,
       t, t, t + interval '1 s', t + interval '30 min', t + interval '30 min',
       'MAX_DURATION_REACHED', 1, 100000
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g,
     LATERAL (SELECT now() - interval '30 days' + g * interval '2 s') AS s(t)
"""

INSERT_LIVE = """
INSERT INTO sessions (id, request_id, claim_id, status, avatar_id, request_payload,
                      payload_sha256, vendor_session_id, livekit_url, livekit_room,
                      created_at, start_sent_at, started_at, expires_at, stop_retry_at,
                      end_reason, attempts, max_session_numbers)
SELECT gen_random_uuid(), %(prefix)s || g, 'bench', %(status)s, 'bench-avatar',
       '{"avatar_id": "bench-avatar", "max_session_duration": 30}'::jsonb,
       md5(g::text), %(prefix)s || 'vendor-' || g, 'wss://livekit.simulator.invalid', 'room',
       now() - interval '10 min', now() - interval '10 min', now() - interval '10 min',
       now() + %(expires_in)s::interval, %(retry_at)s, %(reason)s, 1, 100000
FROM generate_series(1, %(count)s::bigint) AS g
"""

RESET_DUE = """
UPDATE sessions SET status = 'active', end_reason = NULL, stop_requested_at = NULL,
                    stop_retry_at = NULL
WHERE request_id LIKE 'live-due-%';
UPDATE sessions SET status = 'stopping', stop_retry_at = now() - interval '1 min'
WHERE request_id LIKE 'live-stopping-%';
"""


def _insert_live(conn: psycopg.Connection[Any]) -> None:
    for prefix, status, count, expires_in, retry_at, reason in (
        ("live-future-", "active", LIVE_FUTURE, "1 hour", None, None),
        ("live-due-", "active", LIVE_DUE, "-1 min", None, None),
        ("live-stopping-", "stopping", STOPPING_DUE, "-5 min", "now", "MAX_DURATION_REACHED"),
    ):
        conn.execute(
            INSERT_LIVE,
            {
                "prefix": prefix,
                "status": status,
                "count": count,
                "expires_in": expires_in,
                "retry_at": datetime.now(UTC) - timedelta(minutes=1) if retry_at else None,
                "reason": reason,
            },
        )


class StatementCapture:
    """Records the SQL an engine sends while enabled (for EXPLAIN)."""

    def __init__(self, engine: Any) -> None:
        self.enabled = False
        self.statements: list[tuple[str, Any]] = []
        event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, _conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if self.enabled:
            self.statements.append((statement, params))


# The sweep claims expired rows with UPDATE … RETURNING: explained (and rolled back) too.
EXPLAINED = ("SELECT", "UPDATE")


def _explainable(statements: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """SELECTs and UPDATEs run once (an executemany, e.g. the ORM's flush of the due retries'
    new ``stop_retry_at``, cannot be EXPLAINed as one statement)."""
    return [
        (q, p)
        for q, p in statements
        if q.lstrip().upper().startswith(EXPLAINED) and not isinstance(p, list | tuple)
    ]


def _time_sql(conninfo: str, statements: list[tuple[str, Any]], repeat: int) -> dict[str, float]:
    """Postgres's own execution time of the captured statements (``EXPLAIN (ANALYZE, FORMAT
    JSON)``, so neither the client nor the transfer of the rows counts), each round in a
    transaction rolled back; and the shared buffers they touched (the index's work)."""
    selects = _explainable(statements)
    times: list[float] = []
    buffers = 0
    with psycopg.connect(conninfo) as conn:
        for i in range(repeat + 3):
            elapsed = 0.0
            buffers = 0
            for statement, params in selects:
                row = conn.execute(
                    f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", params
                ).fetchone()
                assert row is not None
                plan = row[0][0]
                elapsed += float(plan["Execution Time"])
                top = plan["Plan"]
                buffers += int(top.get("Shared Hit Blocks", 0)) + int(
                    top.get("Shared Read Blocks", 0)
                )
            conn.rollback()
            if i >= 3:
                times.append(elapsed)
    return {
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(sorted(times)[int(len(times) * 0.9) - 1], 3),
        "min_ms": round(min(times), 3),
        "buffers": buffers,
    }


def _explain(conninfo: str, statements: list[tuple[str, Any]]) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the captured statements, in a transaction rolled back."""
    out = []
    with psycopg.connect(conninfo) as conn:
        for statement, params in _explainable(statements):
            rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", params).fetchall()
            out.append(statement.strip())
            out.extend(f"  {r[0]}" for r in rows)
            out.append("")
        conn.rollback()
    return "\n".join(out)


@dataclass
class _Table:
    """One database of the sweep comparison: the same live set, ``ended`` ended rows."""

    ended: int
    url: str
    db: Any
    conn: psycopg.Connection[Any]
    capture: StatementCapture
    load_s: float
    times: dict[str, list[float]] = field(default_factory=dict)

    def reset(self) -> None:
        self.conn.execute(RESET_DUE)

    def timed(self, name: str, call: Callable[[], Any], reset: bool) -> None:
        if reset:
            self.reset()
        began = time.perf_counter()
        call()
        self.times.setdefault(name, []).append(time.perf_counter() - began)
        if reset:
            self.reset()

    def captured(self, call: Callable[[], Any]) -> list[tuple[str, Any]]:
        self.capture.statements.clear()
        self.capture.enabled = True
        call()
        self.capture.enabled = False
        self.reset()
        return list(self.capture.statements)


def _stats(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(times) * 1000, 2),
        "p90_ms": round(sorted(times)[int(len(times) * 0.9) - 1] * 1000, 2),
        "min_ms": round(min(times) * 1000, 2),
    }


def _sweep(ctx: BenchContext, big: int) -> dict[str, Any]:
    """Two databases (10,000 and ``big`` ended rows, the same live set), measured in
    alternation round after round, so the machine's noise falls on both alike."""
    from orchestrator import store
    from orchestrator.db import Database

    admission = getattr(store, "admission_state", None)
    repeat = 15 if ctx.quick else 30
    small = 10_000
    tables: list[_Table] = []
    for ended in (small, big):
        url = ctx.database(f"p4-sweep-{ended}")
        conn = ctx.stack.enter_context(psycopg.connect(plain_conninfo(url), autocommit=True))
        log(f"P4: {ended:,} ended rows")
        began = time.monotonic()
        _insert_live(conn)
        conn.execute(INSERT_ENDED, {"first": 1, "last": ended})
        conn.execute("VACUUM ANALYZE sessions")
        db = Database(url, pool_size=2)
        ctx.stack.callback(db.dispose)
        tables.append(
            _Table(ended, url, db, conn, StatementCapture(db.engine), time.monotonic() - began)
        )

    def claim(t: _Table) -> Callable[[], Any]:
        return lambda: store.claim_due_stops(t.db, limit=200, retry_in=30)

    def count(t: _Table) -> Callable[[], Any]:
        assert admission is not None
        return lambda: admission(t.db, 100_000)

    for round_no in range(repeat + 3):  # the first 3 rounds warm caches and are dropped
        for t in tables if round_no % 2 == 0 else reversed(tables):
            t.timed("claim_due_stops", claim(t), reset=True)
            if admission is not None:
                t.timed("admission_state", count(t), reset=False)
    results: dict[str, Any] = {}
    explains: dict[str, str] = {}
    for t in tables:
        figures: dict[str, Any] = {"load_s": round(t.load_s, 1)}
        for name, times in t.times.items():
            figures[name] = _stats(times[3:])
        statements = t.captured(claim(t))
        conninfo = plain_conninfo(t.url)
        figures["claim_due_stops_sql"] = _time_sql(conninfo, statements, repeat)
        explains[f"claim_due_stops, {t.ended:,} ended rows"] = _explain(conninfo, statements)
        if admission is not None:
            explains[f"admission_state, {t.ended:,} ended rows"] = _explain(
                conninfo, t.captured(count(t))
            )
        size = t.conn.execute("SELECT pg_size_pretty(pg_total_relation_size('sessions'))")
        figures["table_size"] = str(size.fetchone()[0])  # type: ignore[index]
        results[str(t.ended)] = figures
    return {"by_ended_rows": results, "explains": explains, "small": small, "big": big}


def run(ctx: BenchContext) -> dict[str, Any]:
    sessions = 300 if ctx.quick else 1000
    big = 100_000 if ctx.quick else 1_000_000
    log(f"P4: {sessions} sessions expiring together, reaper interval {INTERVAL:g} s")
    lag = _lag(ctx, sessions)
    log(f"P4: lag p99 {lag['lag']['p99_ms']} ms; sweep cost with 10,000 vs {big:,} ended rows")
    sweep = _sweep(ctx, big)
    small_fig = sweep["by_ended_rows"][str(sweep["small"])]
    big_fig = sweep["by_ended_rows"][str(sweep["big"])]
    sweep_ratio = ratio(
        big_fig["claim_due_stops"]["median_ms"], small_fig["claim_due_stops"]["median_ms"]
    )
    rows = []
    for key, figures in sweep["by_ended_rows"].items():
        row = [
            f"{int(key):,}",
            figures["table_size"],
            figures["load_s"],
            figures["claim_due_stops"]["median_ms"],
            figures["claim_due_stops"]["p90_ms"],
            figures["claim_due_stops_sql"]["median_ms"],
            figures["claim_due_stops_sql"]["buffers"],
        ]
        if "admission_state" in figures:
            row += [figures["admission_state"]["median_ms"], figures["admission_state"]["p90_ms"]]
        rows.append(row)
    columns = [
        "ended rows",
        "table size",
        "insert + VACUUM ANALYZE s",
        "claim_due_stops() median ms",
        "p90 ms",
        "its statements in Postgres (EXPLAIN ANALYZE execution), median ms",
        "shared buffers touched",
    ]
    if "admission_state" in small_fig:
        columns += ["admission_state median ms", "p90 ms"]
    targets = [
        {
            "name": "expiry → stop lag p99",
            "value": lag["lag"]["p99_ms"],
            "unit": "ms",
            "op": "<=",
            "target": (INTERVAL + 1.0) * 1000,
            "detail": (
                f"{sessions} expiring together, p50 {lag['lag']['p50_ms']} ms; one at a time:"
                f" p50 {lag['baseline_single_lag']['p50_ms']} / p99"
                f" {lag['baseline_single_lag']['p99_ms']} ms"
            ),
        },
        {
            "name": f"sweep time, {sweep['big']:,} vs {sweep['small']:,} ended rows",
            "value": sweep_ratio,
            "unit": "x",
            "op": "<=",
            "target": TARGET_RATIO,
            "detail": (
                f"claim_due_stops median {big_fig['claim_due_stops']['median_ms']} vs"
                f" {small_fig['claim_due_stops']['median_ms']} ms (claims {LIVE_DUE + STOPPING_DUE}"
                f" due of a live set of {LIVE_FUTURE + LIVE_DUE + STOPPING_DUE})"
            ),
        },
    ]
    figures = [
        {
            # Not the target (that is the sweep's time, above): the statements' own execution
            # in Postgres, to show where a difference comes from. The reads touch the same
            # pages at any table size (partial indexes); the UPDATE's index maintenance grows
            # with the depth of the full-table indexes (log of the table size).
            "name": f"sweep statements in Postgres, {sweep['big']:,} ended rows",
            "value": big_fig["claim_due_stops_sql"]["median_ms"],
            "unit": "ms",
            "baseline": small_fig["claim_due_stops_sql"]["median_ms"],
            "baseline_name": f"{sweep['small']:,} ended rows",
            "detail": (
                "EXPLAIN ANALYZE execution, shared buffers"
                f" {big_fig['claim_due_stops_sql']['buffers']}"
                f" vs {small_fig['claim_due_stops_sql']['buffers']}: the reads are index scans"
                " of the live set (EXPLAIN below); the rest is the UPDATE's index maintenance,"
                " which grows with the btrees' depth"
            ),
        }
    ]
    if "admission_state" in small_fig:
        figures.append(
            {
                "name": f"admission count, {sweep['big']:,} ended rows",
                "value": big_fig["admission_state"]["median_ms"],
                "unit": "ms",
                "baseline": small_fig["admission_state"]["median_ms"],
                "baseline_name": f"{sweep['small']:,} ended rows",
                "detail": "runs under the global admission lock for every start",
            }
        )
    return {
        "interval_s": INTERVAL,
        "lag": lag,
        "sweep": {k: v for k, v in sweep.items() if k != "explains"},
        "notes": [
            f"Lag: {sessions} sessions expiring at the same instant were all ended"
            f" {lag['all_ended_after_s']} s after insertion (expiry 3 s after insertion); the"
            f" vendor stop calls peaked at {lag['vendor_stop_peak_in_flight']} in flight.",
        ],
        "tables": [{"title": "Sweep cost (same live set)", "columns": columns, "rows": rows}],
        "code": [
            {"title": f"EXPLAIN (ANALYZE, BUFFERS): {k}", "text": v}
            for k, v in sweep["explains"].items()
        ],
        "targets": targets,
        "figures": figures,
    }
