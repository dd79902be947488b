"""Webhook isolation: one endpoint that never answers (30 s timeouts) beside healthy ones,
events at a fixed rate; the delivery latency to the healthy endpoints (event committed →
request received), p50/p99/max.

    python -m benchmarks.webhooks_isolation [--rate 200] [--seconds 30] [--healthy 2]

Real parts: a fresh database on the local PostgreSQL (TEST_POSTGRES_URL or 127.0.0.1:5432,
migrated to head), events written through the outbox one transaction each (as transitions
write them), the sender (`orchestrator webhooks send`, 64 attempts at once, 16 per endpoint
or `--per-endpoint`) in a process of its own, the receivers on loopback in this one
(allow-listed). The dead endpoint accepts TCP connections and never answers. Not part of
``make bench``'s report yet; figures in docs/webhooks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from pydantic import SecretStr

from orchestrator.db import Database
from orchestrator.db.migrate import upgrade
from orchestrator.events.outbox import Update, emit
from orchestrator.webhooks import endpoints
from orchestrator.webhooks.secrets import SecretBox, new_key
from orchestrator.webhooks.sender import policy_for
from orchestrator.webhooks.settings import load_webhook_settings
from tests.webhooks.receiver import receiving

SERVER = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def dead_listener() -> tuple[socket.socket, int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)  # accepted by the kernel, never read, never answered
    return listener, listener.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--healthy", type=int, default=2)
    parser.add_argument("--per-endpoint", type=int, default=16)
    args = parser.parse_args()

    name = f"bench_webhooks_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{SERVER.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    try:
        upgrade(url)
        print(
            json.dumps(run(url, args.rate, args.seconds, args.healthy, args.per_endpoint), indent=2)
        )
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(
    url: str, rate: float, seconds: float, healthy: int, per_endpoint: int
) -> dict[str, object]:
    key = new_key()
    settings = load_webhook_settings(secret_key=key, allow="127.0.0.0/8", timeout_seconds=30.0)
    box = SecretBox(SecretStr(key))
    db = Database(url, pool_size=4)
    listener, dead_port = dead_listener()
    receivers = [receiving() for _ in range(healthy)]
    live = [r.__enter__() for r in receivers]
    try:
        policy = policy_for(settings)
        endpoints.add(db, box, policy, f"http://127.0.0.1:{dead_port}/hook")
        for receiver in live:
            endpoints.add(db, box, policy, receiver.url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        env.update(
            ORCHESTRATOR_DATABASE_URL=url,
            ORCHESTRATOR_WEBHOOK_SECRET_KEY=key,
            ORCHESTRATOR_WEBHOOK_ALLOW="127.0.0.0/8",
            ORCHESTRATOR_WEBHOOK_TIMEOUT_SECONDS="30",
            ORCHESTRATOR_WEBHOOK_PER_ENDPOINT_CONCURRENCY=str(per_endpoint),
            ORCHESTRATOR_STATE_DIR=tempfile.mkdtemp(prefix="bench-webhooks-"),
        )
        command = [str(Path(sys.executable).parent / "orchestrator"), "webhooks", "send"]
        sender = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        count = int(rate * seconds)
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
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            len({r.webhook_id for r in x.requests()}) < count for x in live
        ):
            time.sleep(0.1)
        latencies = [
            r.at - datetime.fromisoformat(r.document["timestamp"]).timestamp()
            for x in live
            for r in x.requests()
        ]
        sender.kill()
        sender.wait(10)
        return {
            "events": count,
            "rate_asked": rate,
            "rate_written": round(count / produced, 1),
            "healthy_endpoints": healthy,
            "per_endpoint_concurrency": per_endpoint,
            "delivered_to_healthy": sum(len(x.requests()) for x in live),
            "latency_p50_s": round(percentile(latencies, 0.50), 3),
            "latency_p99_s": round(percentile(latencies, 0.99), 3),
            "latency_max_s": round(max(latencies), 3),
        }
    finally:
        for receiver in receivers:
            receiver.__exit__(None, None, None)
        listener.close()
        db.dispose()


if __name__ == "__main__":
    main()
