"""P1Q queue types: P1's end-to-end starts/s (the queue pre-filled, one worker, threads x64,
zero-latency simulator) on quorum queues (the default: replicated, a delivery limit, per-consumer
prefetch) and on classic queues (``ORCHESTRATOR_QUEUE_TYPE=classic``), back to back in the same
repetition, each in a vhost of its own, alternating which goes first. On this machine's single
RabbitMQ node a quorum queue has one member: what it shows is the cost of the Raft log and
per-consumer QoS, not of replication to other nodes (which adds a network round trip per
confirm)."""

from __future__ import annotations

from typing import Any

from benchmarks.common import truncate
from benchmarks.harness import BenchContext, log
from benchmarks.p1_throughput import CONCURRENCY, measure_ours
from benchmarks.stats import ratio

NAME = "P1Q"
TITLE = "Queue types: end-to-end starts/s on quorum vs classic queues (same run)"


def run(ctx: BenchContext) -> dict[str, Any]:
    count = 500 if ctx.quick else 1200
    database_url = ctx.database("p1q")
    sim = ctx.simulator(max_concurrent_sessions=10_000_000, idle_timeout_seconds=None)
    order = ("classic", "quorum") if ctx.repetition % 2 else ("quorum", "classic")
    measured: dict[str, dict[str, Any]] = {}
    for queue_type in order:
        broker_url = ctx.vhost(f"p1q-{queue_type}")
        truncate(database_url)
        sim.reset()
        log(f"P1Q: {count} starts on {queue_type} queues")
        measured[queue_type] = measure_ours(ctx, database_url, broker_url, sim, count, queue_type)
        log(f"P1Q: {queue_type} {measured[queue_type]['rate_per_s']}/s")
    quorum, classic = measured["quorum"], measured["classic"]
    rel = ratio(quorum["rate_per_s"], classic["rate_per_s"])
    rows = [
        [
            f"{name} queues",
            r["starts"],
            r["rate_per_s"],
            r["drain_rate_per_s"],
            r["publish_rate_per_s"],
            r["worker_cpu_ms_per_start"],
            r["machine_cpu_busy"],
        ]
        for name, r in (("quorum", quorum), ("classic", classic))
    ]
    return {
        "notes": [
            f"{count} starts pre-filled per queue type, one worker (threads x{CONCURRENCY},"
            " prefetch multiplier 1, publisher confirms), zero-latency simulator; quorum and"
            f" classic back to back in order {', '.join(order)}. Single RabbitMQ node: a"
            " one-member quorum queue."
        ],
        "tables": [
            {
                "title": "Starts/s by queue type",
                "columns": [
                    "",
                    "starts",
                    "rate /s, 10th-90th pct of completions",
                    "rate /s, whole drain",
                    "publish /s",
                    "worker CPU ms per start",
                    "machine CPU busy",
                ],
                "rows": rows,
            }
        ],
        "settings": {"concurrency": CONCURRENCY, "order": list(order)},
        "quorum": quorum,
        "classic": classic,
        "targets": [],
        "figures": [
            {
                "name": "starts/s on quorum queues vs classic",
                "value": quorum["rate_per_s"],
                "unit": "/s",
                "baseline": classic["rate_per_s"],
                "baseline_name": "the same run on classic queues",
                "detail": (
                    f"ratio {rel}; whole drain {quorum['drain_rate_per_s']} vs"
                    f" {classic['drain_rate_per_s']}/s; publish {quorum['publish_rate_per_s']}"
                    f" vs {classic['publish_rate_per_s']}/s"
                ),
            }
        ],
    }
