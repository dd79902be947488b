"""Run one seeded schedule against real processes, heal, and check the invariants.

The service: a start worker (``orchestrator.start``) and a steady worker (``orchestrator.control``
with beat: reaper, reconciler, admission, event relay), real ``orchestrator worker`` processes.
Between them and each server sits one fault proxy (tests/faults/tcp_proxy.py): Postgres, the
broker (the run's own vhost on the shared RabbitMQ, which is never touched) and the vendor
(the simulator). The test process publishes (directly, with confirms), samples the number of
live rows, listens to the events exchange, and applies the schedule's faults.

Every run prints its seed and writes its history (schedule, operations, faults, times,
violations) as JSON to ``CHAOS_DIR`` (``.chaos/`` by default).
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kombu import Connection, Exchange, Queue
from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.messaging import EVENTS_EXCHANGE
from orchestrator.producer import Producer, PublishError
from orchestrator.simulator import SimulatorServer
from tests import invariants as inv
from tests.chaos.schedule import Fault, Operation, Schedule
from tests.conftest import APP_ID, USER_KEY, WorkerProcess
from tests.faults.conftest import kill_worker, take_dead_letters
from tests.faults.crashable_postgres import CrashablePostgres
from tests.faults.tcp_proxy import TcpProxy

CHAOS_DIR = Path(os.environ.get("CHAOS_DIR", ".chaos"))
PLANTED_KEY = "chaos-planted-llm-key-77c1"
BASE_LATENCY = "start=0.3,stop=0.1"
SETTLE_SECONDS = 60.0


def libfaketime() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    return found[0] if found else None


@dataclass
class History:
    seed: str
    path: Path
    started: float = field(default_factory=time.monotonic)
    entries: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, kind: str, what: str, **detail: Any) -> None:
        with self._lock:
            at = round(time.monotonic() - self.started, 3)
            wall = datetime.now(UTC).isoformat(timespec="milliseconds")
            self.entries.append({"t": at, "wall": wall, "kind": kind, "what": what, **detail})

    def write(self, **extra: Any) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            body = {"seed": self.seed, **extra, "history": self.entries}
        self.path.write_text(json.dumps(body, indent=1, default=str))
        return self.path


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


def _with_port(url: str, port: int) -> str:
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def _amqp_with_port(url: str, port: int) -> str:
    head, _, rest = url.partition("@")
    vhost = rest.split("/", 1)[1] if "/" in rest else ""
    return f"{head}@127.0.0.1:{port}/{vhost}"


class Service:
    """The two workers, their proxies, and what a fault does to each part."""

    def __init__(
        self,
        settings: Callable[..., Settings],
        database_url: str,
        broker_url: str,
        sim: SimulatorServer,
        workdir: Path,
        history: History,
        crashable: CrashablePostgres | None = None,
    ) -> None:
        self.history = history
        self.crashable = crashable
        self.sim = sim
        self.workdir = workdir
        db_url = make_url(database_url)
        broker_host = broker_url.partition("@")[2].split("/")[0]
        self.pg = TcpProxy(db_url.host or "127.0.0.1", db_url.port or 5432).start()
        host, _, port = broker_host.partition(":")
        self.broker = TcpProxy(host, int(port or 5672)).start()
        self.vendor = TcpProxy("127.0.0.1", sim.port).start()
        self._settings = settings
        self._urls = {
            "database_url": _with_port(database_url, self.pg.port),
            "broker_url": _amqp_with_port(broker_url, self.broker.port),
            "deepbrain_base_url": f"http://127.0.0.1:{self.vendor.port}",
        }
        self.workers: dict[str, WorkerProcess] = {}
        self._logs: list[Path] = []
        self._starting: dict[str, threading.Thread] = {}
        self.outages: list[tuple[datetime, datetime]] = []
        self._open: dict[int, datetime] = {}

    def settings(self, name: str) -> Settings:
        return self._settings(name, **self._urls)

    def start_worker(self, name: str, env_extra: dict[str, str] | None = None) -> None:
        queues = "orchestrator.start" if name == "starter" else "orchestrator.control"
        extra = ["--queues", queues, "--hostname", f"{name}-{uuid.uuid4().hex[:4]}@%h"]
        if name == "steady":
            extra.append("--beat")
        log = self.workdir / f"{name}-{len(self._logs)}.log"
        self._logs.append(log)
        self.workers[name] = WorkerProcess(self.settings(name), log, *extra, env_extra=env_extra)

    def start_later(
        self,
        name: str,
        env_extra: dict[str, str] | None = None,
        began: datetime | None = None,
        *,
        restart: bool = False,
    ) -> None:
        """Start a worker without holding up the schedule (a start during a stall waits);
        ``began``: the outage its absence is part of, closed once it runs."""

        previous = self._starting.get(name)

        def start() -> None:
            if previous is not None:
                previous.join(60)
            if restart:
                self.kill(name)
            try:
                self.start_worker(name, env_extra)
            except RuntimeError as error:  # it did not come up: the settle check will tell
                self.history.log("note", f"{name} did not start: {str(error)[:200]}")
            if began is not None:
                self.outages.append((began, datetime.now(UTC)))

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        self._starting[name] = thread

    def wait_started(self, name: str | None = None, timeout: float = 60.0) -> None:
        for worker, thread in list(self._starting.items()):
            if name is None or worker == name:
                thread.join(timeout)
                self._starting.pop(worker, None)

    def kill(self, name: str) -> None:
        worker = self.workers.get(name)
        if worker is not None and worker.process.poll() is None:
            kill_worker(worker)
            worker.stop()

    def stop_all(self) -> None:
        self.wait_started()  # no worker may come up after this
        for worker in self.workers.values():
            worker.stop()
        for proxy in (self.pg, self.broker, self.vendor):
            proxy.close()

    def logs(self) -> dict[str, str]:
        return {f"log {p.name}": p.read_text(errors="replace") for p in self._logs if p.exists()}

    # -- faults ---------------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        self._open[id(fault)] = datetime.now(UTC)
        kind = fault.kind
        if kind in ("kill-starter", "kill-steady"):
            self.kill(kind.removeprefix("kill-"))
        elif kind == "clock-jump":
            lib = libfaketime()
            if lib is None:
                self.history.log("note", "libfaketime missing: clock-jump is a plain restart")
                self.start_later("starter", restart=True)
            else:
                env = {
                    "LD_PRELOAD": lib,
                    "FAKETIME": f"{fault.offset_seconds:+d}s",
                    "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                }
                self.start_later("starter", env, restart=True)
        elif kind.endswith("-cut"):
            self._proxy(kind).cut()
        elif kind.endswith("-stall"):
            self._proxy(kind).stall()
        elif kind == "pg-drop-reply":
            self.pg.drop_reply_to(b"UPDATE")
        elif kind == "vendor-drop-reply":
            self.vendor.drop_reply_to(b"/api/v2/sessions/start")
        elif kind == "vendor-latency":
            self.sim.configure(endpoint_latency="start=2.5,stop=1.5,list=1.0")
        elif kind == "vendor-errors":
            self.sim.configure(failure_rate="start=0.5,stop=0.5,list=0.5,detail=0.5")
        elif kind == "pg-crash":
            assert self.crashable is not None, "a crash schedule needs a crashable Postgres"
            self.crashable.crash()

    def heal(self, fault: Fault) -> None:
        kind = fault.kind
        if kind in ("kill-starter", "kill-steady", "clock-jump"):
            name = "steady" if kind == "kill-steady" else "starter"
            self.start_later(name, began=self._open.pop(id(fault), None), restart=True)
        elif kind.endswith("-cut"):
            self._proxy(kind).restore()
        elif kind.endswith("-stall"):
            self._proxy(kind).unstall()
        elif kind == "vendor-latency":
            self.sim.configure(endpoint_latency=BASE_LATENCY)
        elif kind == "vendor-errors":
            self.sim.configure(failure_rate={})
        elif kind == "pg-crash":
            assert self.crashable is not None
            self.crashable.restart()
        began = self._open.pop(id(fault), None)
        if began is not None:
            self.outages.append((began, datetime.now(UTC)))

    def _proxy(self, kind: str) -> TcpProxy:
        return {"pg": self.pg, "broker": self.broker, "vendor": self.vendor}[
            kind.split("-", maxsplit=1)[0]
        ]


class EventTap:
    """A queue of the run's own bound to the events exchange: what was really published."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.queue = Queue(
            f"chaos.events.{uuid.uuid4().hex[:8]}",
            Exchange(EVENTS_EXCHANGE, type="topic", durable=True),
            routing_key="#",
            durable=False,
            auto_delete=False,
        )
        with Connection(broker_url) as conn:
            self.queue(conn.default_channel).declare()

    def drain(self) -> list[dict[str, Any]]:
        bodies = []
        with Connection(self.broker_url) as conn:
            channel = conn.default_channel
            while (message := channel.basic_get(self.queue.name, no_ack=True)) is not None:
                try:
                    bodies.append(json.loads(message.body))
                except ValueError:
                    continue
            channel.queue_delete(self.queue.name)
        return bodies


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
) -> Result:
    """One schedule: set up, run operations and faults, heal, settle, check."""
    name = schedule.name
    history = History(name, CHAOS_DIR / f"chaos-{name}.json")
    print(f"chaos: seed {name} (replay: make chaos SEED={name})", flush=True)
    began = time.monotonic()
    _reset(db, sim)
    take_dead_letters(broker_url)
    tap = EventTap(broker_url)
    service = Service(settings, database_url, broker_url, sim, workdir, history, crashable)
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
