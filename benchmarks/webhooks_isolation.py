"""P6 webhook isolation: one endpoint that never answers (30 s timeouts) beside healthy ones,
events at a fixed rate; the delivery latency to the healthy endpoints (event committed →
request received), p50/p99/max, beside the same load with no dead endpoint (same run).

    python -m benchmarks.run --only P6 --repeat 1       # in the harness (make bench runs it)
    python -m benchmarks.webhooks_isolation [--rate 200] [--seconds 30] [--healthy 2] [--no-dead]
        [--processes 1]

Real parts: a database of its own on the local PostgreSQL (migrated to head), events written
through the outbox one transaction each (as transitions write them), the sender
(`orchestrator webhooks send`, 64 attempts at once, 16 per endpoint) in a process of its
own, the healthy receivers on loopback in another (:mod:`benchmarks.webhook_receiver`, asyncio,
keep-alive, 204 at once: they stand in for the receivers' systems, whose CPU is not the
sender's), allow-listed. The dead endpoint (a socket in this process) accepts TCP connections
and never answers. CPU per delivery is reported for the sender, the receivers, and this process
alone (the writer).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from benchmarks.harness import (
    BenchContext,
    ManagedProcess,
    cpu_busy_fraction,
    cpu_seconds,
    loadavg,
    log,
    python_env,
    wait_for,
)
from benchmarks.stats import percentile
from orchestrator.db import Database
from orchestrator.events.outbox import Update, emit
from orchestrator.heartbeat import age_seconds
from orchestrator.webhooks import endpoints
from orchestrator.webhooks.secrets import SecretBox, new_key
from orchestrator.webhooks.sender import policy_for
from orchestrator.webhooks.settings import load_webhook_settings

NAME = "P6"
TITLE = "Webhook isolation: delivery latency to healthy endpoints beside a dead one"
RATE = 200.0
HEALTHY = 2
DEAD_TIMEOUT_SECONDS = 30.0
TARGET_P99_S = 1.0


class Receivers:
    """The healthy endpoints (:mod:`benchmarks.webhook_receiver`) in their own process."""

    def __init__(self, process: ManagedProcess, ports: list[int]) -> None:
        self.process = process
        self.ports = ports
        self.urls = [f"http://127.0.0.1:{port}/hook" for port in ports]

    def _get(self, port: int, path: str) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", path)
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def counts(self) -> list[int]:
        """Distinct ``webhook-id`` received, per endpoint."""
        return [int(self._get(port, "/_count")) for port in self.ports]

    def records(self) -> list[tuple[str, float, str]]:
        """Every request received: webhook-id, arrival (epoch s), the event's timestamp."""
        return [tuple(r) for port in self.ports for r in self._get(port, "/_records")]


@contextlib.contextmanager
def receiving(work_dir: Path, count: int) -> Iterator[Receivers]:
    ready = work_dir / "receivers.ports"
    ready.unlink(missing_ok=True)
    process = ManagedProcess(
        name="receivers",
        command=[
            sys.executable,
            "-m",
            "benchmarks.webhook_receiver",
            "--ports",
            str(count),
            "--ready",
            str(ready),
        ],
        env=python_env({}),
        log_path=work_dir / "receivers.log",
    )
    try:
        wait_for(lambda: ready.exists() or not process.alive(), 30, "the receivers' start-up")
        if not process.alive():
            raise RuntimeError(f"the receivers exited:\n{process.log_tail()}")
        yield Receivers(process, json.loads(ready.read_text()))
    finally:
        process.stop(5.0)


@contextlib.contextmanager
def dead_endpoint() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def measure(
    url: str,
    work_dir: Path,
    *,
    rate: float,
    seconds: float,
    healthy: int,
    dead: bool,
    per_endpoint: int = 16,
    processes: int = 1,
) -> dict[str, Any]:
    """One measurement on a fresh (migrated, empty) database: endpoints, the sender(s), events.
    ``processes`` senders share the work as the chart's replicas do (claims leased in the
    database); the sender CPU reported is theirs together."""
    key = new_key()
    settings = load_webhook_settings(secret_key=key, allow="127.0.0.0/8", timeout_seconds=30.0)
    box = SecretBox(SecretStr(key))
    db = Database(url, pool_size=4)
    with contextlib.ExitStack() as stack:
        stack.callback(db.dispose)
        receivers = stack.enter_context(receiving(work_dir, healthy))
        policy = policy_for(settings)
        if dead:
            port = stack.enter_context(dead_endpoint())
            endpoints.add(db, box, policy, f"http://127.0.0.1:{port}/hook")
        for url_ in receivers.urls:
            endpoints.add(db, box, policy, url_)
        senders: list[ManagedProcess] = []
        for i in range(processes):
            state = work_dir / f"sender-{i}"
            state.mkdir(parents=True, exist_ok=True)
            sender = ManagedProcess(
                name=f"webhooks-{'dead' if dead else 'healthy'}-{i}",
                command=[sys.executable, "-m", "orchestrator.cli", "webhooks", "send"],
                env=python_env(
                    {
                        "ORCHESTRATOR_DATABASE_URL": url,
                        "ORCHESTRATOR_WEBHOOK_SECRET_KEY": key,
                        "ORCHESTRATOR_WEBHOOK_ALLOW": "127.0.0.0/8",
                        "ORCHESTRATOR_WEBHOOK_TIMEOUT_SECONDS": str(DEAD_TIMEOUT_SECONDS),
                        "ORCHESTRATOR_WEBHOOK_PER_ENDPOINT_CONCURRENCY": str(per_endpoint),
                        "ORCHESTRATOR_LOG_LEVEL": "WARNING",
                        "ORCHESTRATOR_STATE_DIR": str(state),
                    }
                ),
                log_path=work_dir / f"sender-{'dead' if dead else 'healthy'}-{i}.log",
            )
            senders.append(sender)
            stack.callback(sender.stop, 5.0)
            stack.callback(sender.process.kill)  # the dead endpoint's attempts hold SIGTERM
        # Steady state: events are written once every sender has made its first pass (its
        # heartbeat), or the first second's events would measure the processes' start-up.
        for i in range(processes):
            wait_for(
                lambda i=i: age_seconds(work_dir / f"sender-{i}", "webhooks") is not None,
                60,
                "the sender's first pass",
            )
        count = int(rate * seconds)
        busy = cpu_busy_fraction()
        cpu0, runner0 = sum(cpu_seconds(x.pid) for x in senders), time.process_time()
        receivers0 = cpu_seconds(receivers.process.pid)
        began = time.monotonic()
        for n in range(count):
            wait = began + n / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with db.transaction() as session:
                emit(
                    session,
                    [Update("ended", f"bench-{n}", f"v-{n}", None, None)],
                    datetime.now(UTC),
                )
        produced = time.monotonic() - began
        drain_deadline = time.monotonic() + 30
        while time.monotonic() < drain_deadline and any(n < count for n in receivers.counts()):
            time.sleep(0.1)
        sender_cpu = sum(cpu_seconds(x.pid) for x in senders) - cpu0
        runner_cpu = time.process_time() - runner0  # this process alone: the writer
        receivers_cpu = cpu_seconds(receivers.process.pid) - receivers0
        machine_busy = busy()
        records = receivers.records()
        stamped = [(datetime.fromisoformat(stamp).timestamp(), at) for _, at, stamp in records]
        latencies = [at - written for written, at in stamped]
        delivered = sum(receivers.counts())
        # p99 by second of writing: when the latency builds up, not only how much.
        start = min((written for written, _ in stamped), default=0.0)
        by_second: dict[int, list[float]] = {}
        for written, at in stamped:
            by_second.setdefault(int(written - start), []).append(at - written)
    return {
        "events": count,
        "rate_written": round(count / produced, 1),
        "delivered_to_healthy": delivered,
        "expected_to_healthy": count * healthy,
        "p50_s": round(percentile(latencies, 50), 3),
        "p99_s": round(percentile(latencies, 99), 3),
        "max_s": round(max(latencies), 3) if latencies else float("nan"),
        "sender_cpu_ms_per_delivery": round(1000 * sender_cpu / max(delivered, 1), 3),
        "runner_cpu_ms_per_delivery": round(1000 * runner_cpu / max(delivered, 1), 3),
        "receivers_cpu_ms_per_delivery": round(1000 * receivers_cpu / max(delivered, 1), 3),
        "machine_cpu_busy": round(machine_busy, 2),
        "p99_s_by_second": [round(percentile(by_second[k], 99), 3) for k in sorted(by_second)],
    }


def _truncate(url: str) -> None:
    db = Database(url, pool_size=1)
    try:
        with db.transaction() as session:
            from sqlalchemy import text

            session.execute(
                text(
                    "TRUNCATE webhook_attempts, webhook_deliveries, webhook_secrets,"
                    " webhook_endpoints, event_outbox CASCADE"
                )
            )
    finally:
        db.dispose()


def run(ctx: BenchContext) -> dict[str, Any]:
    seconds = 10.0 if ctx.quick else 30.0
    url = ctx.database("p6")
    order = (False, True) if ctx.repetition % 2 else (True, False)
    measured: dict[bool, dict[str, Any]] = {}
    for dead in order:
        _truncate(url)
        log(f"P6: {RATE:g} events/s for {seconds:g} s, {HEALTHY} healthy, dead endpoint: {dead}")
        load = loadavg()
        measured[dead] = {
            **measure(
                url,
                ctx.scratch(f"dead-{dead}"),
                rate=RATE,
                seconds=seconds,
                healthy=HEALTHY,
                dead=dead,
            ),
            "loadavg_before": load,
        }
        log(f"P6: dead={dead}: p99 {measured[dead]['p99_s']} s")
    with_dead, alone = measured[True], measured[False]
    rows = [
        [
            label,
            r["events"],
            r["rate_written"],
            f"{r['delivered_to_healthy']} of {r['expected_to_healthy']}",
            r["p50_s"],
            r["p99_s"],
            r["max_s"],
            r["sender_cpu_ms_per_delivery"],
            r["machine_cpu_busy"],
        ]
        for label, r in (("with the dead endpoint", with_dead), ("healthy endpoints only", alone))
    ]
    return {
        "notes": [
            f"{RATE:g} events/s for {seconds:g} s through the outbox, {HEALTHY} healthy endpoints"
            " (loopback, in a process of their own, answering 204 at once) and one that accepts"
            " connections and never"
            f" answers ({DEAD_TIMEOUT_SECONDS:g} s timeouts); one sender process (64 attempts at"
            " once, 16 per endpoint, poll 0.2 s). Latency: the event's timestamp (just before"
            " its commit) to the request's arrival; every delivery to the healthy endpoints"
            " counts. The baseline runs the same load without the dead endpoint, back to back,"
            " order alternating between repetitions."
        ],
        "tables": [
            {
                "title": "Delivery latency to the healthy endpoints",
                "columns": [
                    "",
                    "events",
                    "written /s",
                    "delivered to healthy",
                    "p50 s",
                    "p99 s",
                    "max s",
                    "sender CPU ms per delivery",
                    "machine CPU busy",
                ],
                "rows": rows,
            }
        ],
        "with_dead": with_dead,
        "healthy_only": alone,
        "targets": [
            {
                "name": "delivery p99 to healthy endpoints beside a dead one",
                "value": with_dead["p99_s"],
                "unit": "s",
                "op": "<=",
                "target": TARGET_P99_S,
                "detail": (
                    f"p50 {with_dead['p50_s']} s, max {with_dead['max_s']} s;"
                    f" {with_dead['delivered_to_healthy']} of"
                    f" {with_dead['expected_to_healthy']} delivered"
                ),
            }
        ],
        "figures": [
            {
                "name": "delivery p99 beside a dead endpoint vs without it",
                "value": with_dead["p99_s"],
                "unit": "s",
                "baseline": alone["p99_s"],
                "baseline_name": "the same load, healthy endpoints only",
                "detail": f"p50 {with_dead['p50_s']} vs {alone['p50_s']} s",
            }
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=RATE)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--healthy", type=int, default=HEALTHY)
    parser.add_argument("--per-endpoint", type=int, default=16)
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="sender processes (the chart's webhooks.replicas); each 64 attempts, 16 per endpoint",
    )
    parser.add_argument(
        "--dead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with the dead endpoint (default) or, --no-dead, the healthy endpoints only",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        ctx = BenchContext(
            stack=stack,
            work_dir=Path("/tmp") / f"p6-{time.time_ns()}",
            results_dir=Path(),
            quick=False,
        )
        url = ctx.database("p6")
        result = measure(
            url,
            ctx.work_dir,
            rate=args.rate,
            seconds=args.seconds,
            healthy=args.healthy,
            dead=args.dead,
            per_endpoint=args.per_endpoint,
            processes=args.processes,
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
