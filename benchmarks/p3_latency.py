"""P3 overhead latency: enqueue → ``active`` committed, minus the vendor's time, at a steady
50 starts/s, beside the broker's own publish → consume round trip measured in the same run.

The commit is observed exactly: the run's database gets a trigger that sends
``NOTIFY bench_active`` when a row becomes ``active`` (Postgres delivers it at commit), and a
listener in this process timestamps it on the same monotonic clock as the enqueue call. The
vendor's time is the simulator's configured start latency; the HTTP exchange and the simulator's
own handling count as overhead, so the figure is an upper bound. The load is open-loop: a start
is published every 20 ms whatever happened to the previous ones; sessions not active within the
grace period count as that long (percentiles are then lower bounds, and the report says so).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from kombu import Connection, Exchange, Producer, Queue

from benchmarks.common import make_producer, row_times, start_kwargs
from benchmarks.harness import (
    BenchContext,
    log,
    orchestrator_env,
    plain_conninfo,
    start_orchestrator_worker,
)
from benchmarks.stats import ratio, summary_ms

NAME = "P3"
TITLE = "Overhead latency at a steady 50 starts/s vs the broker's round trip"
RATE = 50.0
LIGHT_RATE = 10.0
VENDOR_LATENCY = 0.1
CONCURRENCY = 64
TARGET_P99_MS = 50.0
GRACE = 30.0

TRIGGER_SQL = """
CREATE FUNCTION bench_notify_active() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('bench_active', NEW.request_id);
  RETURN NEW;
END $$;
CREATE TRIGGER bench_notify_active AFTER UPDATE OF status ON sessions FOR EACH ROW
  WHEN (NEW.status = 'active' AND OLD.status IS DISTINCT FROM 'active')
  EXECUTE FUNCTION bench_notify_active();
"""


def paced(duration: float, rate: float) -> list[float]:
    """Scheduled send times (monotonic) for an open-loop load."""
    start = time.monotonic() + 0.2
    return [start + i / rate for i in range(int(duration * rate))]


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def broker_round_trip(broker_url: str, duration: float) -> dict[str, Any]:
    """kombu publish (persistent, publisher confirms) → consume (prefetch 1, ack) at RATE/s."""
    exchange = Exchange("bench.rtt", type="direct", durable=True)
    queue = Queue(
        "bench.rtt",
        exchange,
        routing_key="bench.rtt",
        durable=True,
        queue_arguments={"x-dead-letter-exchange": "bench.dlx"},
    )
    received: dict[int, float] = {}
    stop = threading.Event()
    ready = threading.Event()

    def consume() -> None:
        with Connection(broker_url) as conn:
            channel: Any = conn.channel()
            channel.basic_qos(0, 1, False)

            def on_message(body: Any, message: Any) -> None:
                received[int(body["i"])] = time.monotonic()
                message.ack()

            with conn.Consumer(queue, channel=channel, callbacks=[on_message], accept=["json"]):
                ready.set()
                while not stop.is_set():
                    try:
                        conn.drain_events(timeout=0.2)
                    except TimeoutError:
                        continue

    consumer = threading.Thread(target=consume, name="rtt-consumer", daemon=True)
    consumer.start()
    ready.wait(30)
    sent: dict[int, float] = {}
    with Connection(broker_url, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.channel(), exchange=exchange, routing_key="bench.rtt")
        producer.declare()
        for i, t in enumerate(paced(duration, RATE)):
            _sleep_until(t)
            sent[i] = time.monotonic()
            producer.publish({"i": i}, serializer="json", delivery_mode=2, declare=[queue])
    deadline = time.monotonic() + 10
    while len(received) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    consumer.join(10)
    warm = int(RATE * 2)
    rtt = [received[i] - sent[i] for i in sent if i >= warm and i in received]
    return {**summary_ms(rtt), "lost": len(sent) - len(received)}


class ActiveListener:
    """LISTEN bench_active in a thread; request_id → monotonic time of the commit's notify."""

    def __init__(self, database_url: str) -> None:
        self.seen: dict[str, float] = {}
        self._conn = psycopg.connect(plain_conninfo(database_url), autocommit=True)
        self._conn.execute("LISTEN bench_active")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="listen", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for note in self._conn.notifies(timeout=0.2):
                self.seen[note.payload] = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()


STAGES = (
    "enqueue → row created (publish, broker, Celery dispatch, admission lock)",
    "row created → vendor call sent (begin_attempt; 0 when the claim sets both)",
    "vendor call sent → active (vendor incl. 100 ms, record_started)",
)


def _phase(
    producer: Any,
    listener: ActiveListener,
    database_url: str,
    tag: str,
    rate: float,
    duration: float,
) -> dict[str, Any]:
    """Open-loop starts at ``rate``/s; enqueue → active per start, the first 2 s left out."""
    sent: dict[str, float] = {}
    sent_wall: dict[str, float] = {}
    publish_s: list[float] = []
    late = 0
    for i, t in enumerate(paced(duration, rate)):
        _sleep_until(t)
        if time.monotonic() - t > 0.05:
            late += 1
        kwargs = start_kwargs(tag, i)
        began = time.monotonic()
        sent_wall[kwargs["request_id"]] = time.time()
        producer.enqueue_start_session(**kwargs)
        publish_s.append(time.monotonic() - began)
        sent[kwargs["request_id"]] = began
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline and not set(sent) <= set(listener.seen):
        time.sleep(0.1)
    warm_ids = sorted(sent, key=sent.__getitem__)[int(rate * 2) :]
    e2e = [listener.seen.get(rid, sent[rid] + GRACE) - sent[rid] for rid in warm_ids]
    missing = sum(1 for rid in warm_ids if rid not in listener.seen)
    rows = {r.request_id: r for r in row_times(database_url)}
    parts: dict[str, list[float]] = {k: [] for k in STAGES}
    for rid in warm_ids:
        r = rows.get(rid)
        if r is None or not (r.created_at and r.start_sent_at and r.started_at):
            continue
        parts[STAGES[0]].append(r.created_at.timestamp() - sent_wall[rid])
        parts[STAGES[1]].append((r.start_sent_at - r.created_at).total_seconds())
        parts[STAGES[2]].append((r.started_at - r.start_sent_at).total_seconds())
    return {
        "stages": {k: summary_ms(v) for k, v in parts.items()},
        "rate_per_s": rate,
        "starts": len(sent),
        "late_sends": late,
        "not_active_in_time": missing,
        "overhead": summary_ms([max(0.0, x - VENDOR_LATENCY) for x in e2e]),
        "end_to_end": summary_ms(e2e),
        "enqueue_call": summary_ms(publish_s),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    duration = 10.0 if ctx.quick else 20.0
    broker_url = ctx.vhost("p3")
    database_url = ctx.database("p3")
    with psycopg.connect(plain_conninfo(database_url), autocommit=True) as conn:
        conn.execute(TRIGGER_SQL)
    log(f"P3: broker round trip (kombu) at {RATE:g}/s for {duration:g} s")
    broker = broker_round_trip(broker_url, duration)
    sim = ctx.simulator(
        max_concurrent_sessions=10_000_000,
        idle_timeout_seconds=None,
        endpoint_latency={"start": VENDOR_LATENCY},
    )
    env = orchestrator_env(
        state_dir=ctx.scratch("p3-state"),
        database_url=database_url,
        broker_url=broker_url,
        simulator_url=sim.base_url,
    )
    worker = ctx.managed(start_orchestrator_worker(ctx.scratch("p3"), env, concurrency=CONCURRENCY))
    producer = make_producer(database_url, broker_url)
    producer.enqueue_start_session(**start_kwargs("p3-warm", 0))  # topology, connection
    listener = ActiveListener(database_url)
    phases = {}
    try:
        for rate, seconds in ((LIGHT_RATE, 10.0), (RATE, duration)):
            log(f"P3: orchestrator at {rate:g} starts/s for {seconds:g} s")
            phases[rate] = _phase(producer, listener, database_url, f"p3-{rate:g}", rate, seconds)
    finally:
        listener.stop()
        producer.close()
    worker.stop()
    main, light = phases[RATE], phases[LIGHT_RATE]
    over = main["overhead"]
    notes = [
        f"Open-loop load at {RATE:g}/s for {duration:g} s ({main['starts']} starts), worker"
        f" threads x{CONCURRENCY}, simulator start latency {VENDOR_LATENCY * 1000:.0f} ms"
        f" (subtracted); the first 2 s are left out; {main['late_sends']} sends were more than"
        f" 50 ms late. The {LIGHT_RATE:g}/s phase (same worker, just before) shows the"
        " overhead without queueing.",
    ]
    for phase in (light, main):
        if phase["not_active_in_time"]:
            notes.append(
                f"At {phase['rate_per_s']:g}/s, {phase['not_active_in_time']} starts were not"
                f" active {GRACE:g} s after the load ended: they count as {GRACE:g} s, so those"
                " percentiles are lower bounds (the worker could not keep up)."
            )
    table_rows = []
    for phase in (main, light):
        r = phase["rate_per_s"]
        table_rows += [
            [f"{r:g}/s: overhead (enqueue → active - vendor)", *_cells(phase["overhead"])],
            [f"{r:g}/s: enqueue → active", *_cells(phase["end_to_end"])],
            [f"{r:g}/s: enqueue call (validate, publish, confirm)", *_cells(phase["enqueue_call"])],
        ]
    for phase in (main, light):
        r = phase["rate_per_s"]
        table_rows += [
            [f"{r:g}/s stage: {name}", *_cells(s)] for name, s in phase["stages"].items()
        ]
    table_rows.append(
        [f"baseline: broker publish → consume (kombu) at {RATE:g}/s", *_cells(broker)]
    )
    return {
        "vendor_latency_ms": VENDOR_LATENCY * 1000,
        "phases": {f"{k:g}": v for k, v in phases.items()},
        "baseline_broker_round_trip": broker,
        "worker_peak_rss_mib": round(worker.peak_rss / 2**20, 1),
        "notes": notes,
        "tables": [
            {
                "title": "Latency (ms)",
                "columns": ["measure", "n", "p50", "p90", "p99", "max"],
                "rows": table_rows,
            }
        ],
        "targets": [
            {
                "name": f"overhead p99 at {RATE:g}/s",
                "value": over["p99_ms"],
                "unit": "ms",
                "op": "<=",
                "target": TARGET_P99_MS,
                "detail": (
                    f"p50 {over['p50_ms']} ms; at {LIGHT_RATE:g}/s p50"
                    f" {light['overhead']['p50_ms']} / p99 {light['overhead']['p99_ms']} ms;"
                    f" broker round trip p50 {broker['p50_ms']} / p99 {broker['p99_ms']} ms"
                    f" (overhead p99 = {ratio(over['p99_ms'], broker['p99_ms'])}x broker p99)"
                ),
            }
        ],
    }


def _cells(s: dict[str, Any]) -> list[Any]:
    return [s["n"], s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"]]
