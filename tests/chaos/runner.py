"""Run one seeded schedule against real processes, heal, and check the invariants.

The service: a start worker (``orchestrator.start``) and a steady worker (``orchestrator.control``
with beat: reaper, reconciler, admission, event relay), real ``orchestrator worker`` processes.
Between them and each server sits one fault proxy (tests/faults/tcp_proxy.py): Postgres, the
broker (the run's own vhost on the shared RabbitMQ, which is never touched; in a cluster
schedule, a vhost on a three-node cluster of the run's own, one proxy per node, every process
given all three in its failover list) and the vendor (the simulator). The test process
publishes (directly, with confirms), samples the number of live rows, listens to the events
exchange, and applies the schedule's faults.

Every run prints its seed and writes its history (schedule, operations, faults, times,
violations) as JSON to ``CHAOS_DIR`` (``.chaos/`` by default).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.producer import Producer, PublishError
from orchestrator.simulator import SimulatorServer
from tests import invariants as inv
from tests.chaos.schedule import Fault, Operation, Schedule
from tests.chaos.service import BASE_LATENCY, ClusterRun, EventTap, History, Service
from tests.conftest import APP_ID, USER_KEY
from tests.faults.conftest import take_dead_letters
from tests.faults.crashable_postgres import CrashablePostgres

CHAOS_DIR = Path(os.environ.get("CHAOS_DIR", ".chaos"))
PLANTED_KEY = "chaos-planted-llm-key-77c1"
SETTLE_SECONDS = 60.0


@dataclass
class Result:
    seed: str
    violations: list[inv.Violation]
    history_path: Path
    faults: list[str]
    confirmed: int
    duplicates: int
    seconds: float

    def describe(self) -> str:
        lines = [
            f"chaos seed {self.seed}: {len(self.violations)} violation(s)",
            f"  replay: make chaos SEED={self.seed}",
            f"  history: {self.history_path}",
            f"  faults: {', '.join(self.faults) or 'none'}",
        ]
        lines += [f"  {v}" for v in self.violations]
        return "\n".join(lines)


def _start_kwargs(op: Operation) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "request_id": op.request_id,
        "avatar_id": f"avatar-{op.request_id}",  # one avatar per request: duplicates show
        "avatar_persona": {
            "llm_configurations": {
                "provider": "custom",
                "custom_http": {"headers": {"Authorization": f"Bearer {PLANTED_KEY}"}},
            }
        },
    }
    if op.max_duration_seconds is not None:
        kwargs["max_duration_seconds"] = op.max_duration_seconds
    return kwargs


def _reset(db: Database, sim: SimulatorServer) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE sessions, session_events, event_outbox, early_stops, sweep_leases"
                " RESTART IDENTITY CASCADE"
            )
        )
    sim.reset(restore_config=True)
    sim.configure(
        max_concurrent_sessions=1000, idle_timeout_seconds=None, endpoint_latency=BASE_LATENCY
    )


def _settled(db: Database, confirmed: list[str], dead: set[str]) -> bool:
    try:
        with db.engine.connect() as conn:
            query = text("SELECT request_id, status FROM sessions")
            found = dict(conn.execute(query).tuples().all())
    except Exception:  # a connection the crash left stale: ask again
        return False
    return all(
        found.get(rid) in ("active", "ended", "failed") or (rid not in found and rid in dead)
        for rid in confirmed
    )


def run(
    schedule: Schedule,
    *,
    settings: Callable[..., Settings],
    database_url: str,
    broker_url: str,
    db: Database,
    sim: SimulatorServer,
    workdir: Path,
    crashable: CrashablePostgres | None = None,
    cluster: ClusterRun | None = None,
) -> Result:
    """One schedule: set up, run operations and faults, heal, settle, check. ``broker_url``:
    the shared broker's vhost, or a cluster's failover list (``cluster``)."""
    name = schedule.name
    history = History(name, CHAOS_DIR / f"chaos-{name}.json")
    print(f"chaos: seed {name} (replay: make chaos SEED={name})", flush=True)
    began = time.monotonic()
    _reset(db, sim)
    take_dead_letters(broker_url)
    tap = EventTap(broker_url, quorum=cluster is not None)
    service = Service(settings, database_url, broker_url, sim, workdir, history, crashable, cluster)
    producer = Producer(settings("producer", broker_url=broker_url))
    confirmed: list[str] = []
    samples: list[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.25):
            try:
                samples.append(inv.live_row_count(db))
            except Exception:
                continue

    sampler = threading.Thread(target=sample, daemon=True)
    violations: list[inv.Violation] = []
    try:
        service.start_worker("steady")
        service.start_worker("starter")
        sampler.start()
        history.started = time.monotonic()
        history.log("run", "schedule", **schedule.as_dict())
        _play(schedule, service, producer, history, confirmed)
        service.wait_started()
        history.log("heal", "all faults healed, waiting for the service to settle")
        db.engine.dispose()  # the test's own connections may predate a Postgres crash
        dead: set[str] = set()
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline and not _settled(db, confirmed, dead):
            time.sleep(0.5)
            dead |= _dead_request_ids(broker_url, confirmed, history)
        bounds = inv.Bounds.from_settings(service.settings("check"))
        time.sleep(bounds.orphan)  # every orphan made before the heal is past its bound
        service.wait_nodes()  # every node up again before the tap is drained
        stop_sampling.set()
        world = inv.snapshot(db, sim, service.logs())
        expect = inv.Expect(
            confirmed=confirmed,
            dead_lettered=dead,
            secrets=(PLANTED_KEY, APP_ID, USER_KEY),
            live_samples=samples,
            events_seen=tap.drain(),
            outages=service.outages,
        )
        violations = inv.check_all(world, bounds, expect)
        history.log("check", "invariants", checked=list(inv.CHECKS), violations=len(violations))
        duplicates = inv.duplicates(world)
    finally:
        stop_sampling.set()
        producer.close()
        service.stop_all()
    result = Result(
        name,
        violations,
        history.path,
        [f.kind for f in schedule.faults],
        len(confirmed),
        duplicates,
        round(time.monotonic() - began, 1),
    )
    history.write(
        violations=[str(v) for v in violations],
        confirmed=len(confirmed),
        duplicates=duplicates,
        max_live=max(samples, default=0),
    )
    print(result.describe(), flush=True)
    return result


def _dead_request_ids(broker_url: str, confirmed: list[str], history: History) -> set[str]:
    found: set[str] = set()
    letters = take_dead_letters(broker_url)
    for message in letters:
        body = message.body
        text_body = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
        found |= {rid for rid in confirmed if rid in text_body}
    if letters:
        tasks = sorted({str((m.headers or {}).get("task")) for m in letters})
        history.log("dead-letters", f"{len(letters)} taken", request_ids=sorted(found), tasks=tasks)
    return found


def _play(
    schedule: Schedule,
    service: Service,
    producer: Producer,
    history: History,
    confirmed: list[str],
) -> None:
    """Operations and faults in time order; every fault healed at its time, the rest at the
    end of the schedule."""
    steps: list[tuple[float, str, Any]] = [(op.at, "op", op) for op in schedule.operations]
    for fault in schedule.faults:
        steps.append((fault.at, "fault", fault))
        steps.append((fault.at + fault.heal_after, "heal", fault))
    steps.sort(key=lambda step: (step[0], step[1] != "heal"))
    open_faults: list[Fault] = []
    t0 = time.monotonic()
    for at, kind, item in steps:
        delay = t0 + min(at, schedule.length) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if kind == "op":
            _operate(item, producer, history, confirmed)
        elif kind == "fault":
            history.log("fault", item.kind, heal_after=item.heal_after, offset=item.offset_seconds)
            service.inject(item)
            open_faults.append(item)
        elif item in open_faults:
            service.heal(item)
            open_faults.remove(item)
            history.log("heal", item.kind)
    for fault in open_faults:
        service.heal(fault)
        history.log("heal", fault.kind)


def _operate(op: Operation, producer: Producer, history: History, confirmed: list[str]) -> None:
    try:
        if op.kind == "start":
            producer.enqueue_start_session(**_start_kwargs(op))
            confirmed.append(op.request_id)
        else:
            producer.request_stop(request_id=op.request_id)
        history.log("op", op.kind, request_id=op.request_id, duration=op.max_duration_seconds)
    except PublishError as error:
        history.log("op", f"{op.kind} refused", request_id=op.request_id, error=str(error))
