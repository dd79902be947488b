"""The service under a fault schedule: its two worker processes, the fault proxies in front of
Postgres, the broker (one per node of a failover list) and the vendor, what each fault does and
how it heals; the history file; a tap on the events exchange."""

from __future__ import annotations

import glob
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kombu import Connection, Exchange, Queue
from sqlalchemy.engine import make_url

from orchestrator.config import Settings
from orchestrator.messaging import EVENTS_EXCHANGE, START_QUEUE
from orchestrator.simulator import SimulatorServer
from tests.chaos.schedule import Fault
from tests.conftest import WorkerProcess
from tests.faults.conftest import kill_worker
from tests.faults.crashable_postgres import CrashablePostgres
from tests.faults.tcp_proxy import TcpProxy
from tests.rabbit_cluster import Node, RabbitCluster

BASE_LATENCY = "start=0.3,stop=0.1"


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


def _with_port(url: str, port: int) -> str:
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def _amqp_with_port(url: str, port: int) -> str:
    head, _, rest = url.partition("@")
    vhost = rest.split("/", 1)[1] if "/" in rest else ""
    return f"{head}@127.0.0.1:{port}/{vhost}"


def _amqp_address(url: str) -> tuple[str, int]:
    host, _, port = url.partition("@")[2].split("/")[0].partition(":")
    return host, int(port or 5672)


@dataclass
class ClusterRun:
    """A cluster schedule's broker: the cluster and the run's vhost on it."""

    cluster: RabbitCluster
    vhost: str


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
        cluster: ClusterRun | None = None,
    ) -> None:
        self.history = history
        self.crashable = crashable
        self.cluster = cluster
        self.sim = sim
        self.workdir = workdir
        db_url = make_url(database_url)
        self.pg = TcpProxy(db_url.host or "127.0.0.1", db_url.port or 5432).start()
        # One proxy per URL of the broker's failover list (one per node of a cluster): a
        # broker fault acts on all of them, a node's death on its own.
        broker_urls = [part.strip() for part in broker_url.split(";")]
        self.brokers = [TcpProxy(*_amqp_address(url)).start() for url in broker_urls]
        self.vendor = TcpProxy("127.0.0.1", sim.port).start()
        self._settings = settings
        self._urls = {
            "database_url": _with_port(database_url, self.pg.port),
            "broker_url": ";".join(
                _amqp_with_port(url, proxy.port)
                for url, proxy in zip(broker_urls, self.brokers, strict=True)
            ),
            "deepbrain_base_url": f"http://127.0.0.1:{self.vendor.port}",
        }
        self.workers: dict[str, WorkerProcess] = {}
        self._logs: list[Path] = []
        self._starting: dict[str, threading.Thread] = {}
        self.outages: list[tuple[datetime, datetime]] = []
        self._open: dict[int, datetime] = {}
        self._killed: dict[int, Node] = {}
        self._node_restart: threading.Thread | None = None

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
        for proxy in (self.pg, *self.brokers, self.vendor):
            proxy.close()
        self.wait_nodes()

    def wait_nodes(self, timeout: float = 180.0) -> None:
        """Every node of the cluster running again (the next schedule shares it)."""
        restart = self._node_restart
        if restart is not None:
            restart.join(timeout)
        if self.cluster is not None:
            for node in self.cluster.cluster.nodes:
                if node.process is None or node.process.poll() is not None:
                    self._restart_node(node)

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
            for proxy in self._proxies(kind):
                proxy.cut()
        elif kind.endswith("-stall"):
            for proxy in self._proxies(kind):
                proxy.stall()
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
        elif kind == "broker-node-kill":
            self._kill_node(fault)

    def heal(self, fault: Fault) -> None:
        kind = fault.kind
        if kind in ("kill-starter", "kill-steady", "clock-jump"):
            name = "steady" if kind == "kill-steady" else "starter"
            self.start_later(name, began=self._open.pop(id(fault), None), restart=True)
        elif kind.endswith("-cut"):
            for proxy in self._proxies(kind):
                proxy.restore()
        elif kind.endswith("-stall"):
            for proxy in self._proxies(kind):
                proxy.unstall()
        elif kind == "vendor-latency":
            self.sim.configure(endpoint_latency=BASE_LATENCY)
        elif kind == "vendor-errors":
            self.sim.configure(failure_rate={})
        elif kind == "pg-crash":
            assert self.crashable is not None
            self.crashable.restart()
        elif kind == "broker-node-kill":
            node = self._killed.pop(id(fault), None)
            if node is not None:
                thread = threading.Thread(target=self._restart_node, args=(node,), daemon=True)
                thread.start()
                self._node_restart = thread
        began = self._open.pop(id(fault), None)
        if began is not None:
            self.outages.append((began, datetime.now(UTC)))

    def _proxies(self, kind: str) -> list[TcpProxy]:
        part = kind.split("-", maxsplit=1)[0]
        return {"pg": [self.pg], "broker": self.brokers, "vendor": [self.vendor]}[part]

    # -- a node of the cluster -------------------------------------------------------

    def _kill_node(self, fault: Fault) -> None:
        """SIGKILL one node, only while every node runs (a majority is always left)."""
        assert self.cluster is not None, "a cluster schedule needs the cluster"
        cluster = self.cluster.cluster
        restarting = self._node_restart is not None and self._node_restart.is_alive()
        if restarting or len(cluster.running()) < len(cluster.nodes):
            self.history.log("note", f"{fault.kind} skipped: a node is still restarting")
            return
        node = self._node_for(fault.target)
        node.kill()
        self._killed[id(fault)] = node
        self.history.log("note", f"killed {node.name} ({fault.target})")

    def _node_for(self, target: str) -> Node:
        assert self.cluster is not None
        cluster = self.cluster.cluster
        if target.startswith("node"):
            return cluster.nodes[int(target.removeprefix("node"))]
        try:
            return cluster.leader(START_QUEUE, self.cluster.vhost, timeout=5)
        except (LookupError, RuntimeError) as error:  # no queue yet: everyone's first node
            self.history.log("note", f"no leader of {START_QUEUE} found: {str(error)[:200]}")
            return cluster.nodes[0]

    def _restart_node(self, node: Node) -> None:
        began = time.monotonic()
        try:
            node.start()
            node.wait_up()
        except RuntimeError as error:
            self.history.log("note", f"{node.name} did not come back: {str(error)[-300:]}")
            return
        self.history.log("note", f"{node.name} back after {time.monotonic() - began:.1f} s")


class EventTap:
    """A queue of the run's own bound to the events exchange: what was really published."""

    def __init__(self, broker_url: str, *, quorum: bool = False) -> None:
        """``quorum``: a quorum queue, which outlives the death of one node of a cluster."""
        self.broker_url = broker_url
        self.queue = Queue(
            f"chaos.events.{uuid.uuid4().hex[:8]}",
            Exchange(EVENTS_EXCHANGE, type="topic", durable=True),
            routing_key="#",
            durable=quorum,
            auto_delete=False,
            queue_arguments={"x-queue-type": "quorum"} if quorum else None,
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
