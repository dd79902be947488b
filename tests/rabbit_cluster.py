"""A three-node RabbitMQ cluster of this test run's own, on free ports, in a temporary folder:
``rabbitmq-server`` started three times with its own node name, ports, data, log and config
(the machine's node on 5672 is not touched), nodes two and three joined to the first.

Needs ``rabbitmq-server`` and root (the server runs as the ``rabbitmq`` user, which shares
the machine node's Erlang cookie, so ``rabbitmqctl -n`` reaches every node).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kombu import Connection

START_TIMEOUT_SECONDS = 120.0
# Erlang's schedulers spin while idle; three idle nodes would eat the machine's two cores.
QUIET_ERLANG = "+sbwt none +sbwtdcpu none +sbwtdio none"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rabbitmqctl(node: str, *args: str, timeout: float = 90) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", "-n", node, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl -n {node} {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


@dataclass
class Node:
    name: str  # e.g. orch1a2b3c-a@localhost
    port: int
    dist_port: int
    base: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.base / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.base / "node.pid"

    def url(self, vhost: str = "/") -> str:
        shown = "" if vhost == "/" else vhost
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{shown}"

    def env(self) -> dict[str, str]:
        config = self.base / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nlog.console = true\nlog.file = false\n"
        )
        plugins = self.base / "enabled_plugins"
        plugins.write_text("[].\n")
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(config.with_suffix("")),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": QUIET_ERLANG,
        }

    def start(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                ["rabbitmq-server"],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                rabbitmqctl(self.name, "await_startup", "--timeout", "60")
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def beam_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM (no clean shutdown: a crash)."""
        pid = self.beam_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while pid is not None and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class RabbitCluster:
    """Three nodes: ``nodes[0]`` is the one the others joined."""

    def __init__(self, size: int = 3) -> None:
        run = uuid.uuid4().hex[:6]
        self.root = Path(tempfile.mkdtemp(prefix="orch-cluster-"))
        self.nodes = [
            Node(
                f"orch{run}{chr(ord('a') + i)}@localhost",
                free_port(),
                free_port(),
                self.root / str(i),
            )
            for i in range(size)
        ]

    def __enter__(self) -> RabbitCluster:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _start(self) -> None:
        shutil.chown(self.root, "rabbitmq", "rabbitmq")
        self.root.chmod(0o755)
        for node in self.nodes:
            node.base.mkdir()
            (node.base / "log").mkdir()
            (node.base / "mnesia").mkdir()
            for path in (node.base, node.base / "log", node.base / "mnesia"):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        for node in self.nodes:
            node.start()
        self._each(lambda node: node.wait_up(), self.nodes)
        first = self.nodes[0].name

        def join(node: Node) -> None:
            rabbitmqctl(node.name, "stop_app")
            rabbitmqctl(node.name, "join_cluster", first)
            rabbitmqctl(node.name, "start_app")

        for node in self.nodes[1:]:  # one at a time: two joining at once can fail in mnesia
            join(node)
        status = json.loads(rabbitmqctl(first, "cluster_status", "--formatter", "json"))
        running = set(status.get("running_nodes", []))
        if running != {node.name for node in self.nodes}:
            raise RuntimeError(f"the cluster did not form: running {sorted(running)}")

    @staticmethod
    def _each(action: Callable[[Node], None], nodes: list[Node]) -> None:
        errors: list[BaseException] = []

        def run(node: Node) -> None:
            try:
                action(node)
            except BaseException as error:  # re-raised below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(n,)) for n in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def failover_url(self, first: Node, vhost: str = "/") -> str:
        """kombu's failover list, ``first`` first."""
        ordered = [first, *(node for node in self.nodes if node is not first)]
        return ";".join(node.url(vhost) for node in ordered)

    def add_vhost(self, vhost: str) -> None:
        first = self.running()[0].name
        rabbitmqctl(first, "add_vhost", vhost)
        rabbitmqctl(first, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def leader(self, queue: str, vhost: str, timeout: float = 30) -> Node:
        """The node holding ``queue``'s leader (a quorum queue), once a running one does. A
        classic queue has no leader: it lives on the node it was declared through, which the
        tests make the first."""
        deadline = time.monotonic() + timeout
        while True:
            ask = self.running()[0].name
            found = json.loads(
                rabbitmqctl(
                    ask, "list_queues", "-p", vhost, "name", "type", "leader", "--formatter", "json"
                )
            )
            rows = [row for row in found if row["name"] == queue]
            if rows and rows[0].get("type") == "classic":
                return self.nodes[0]
            leaders = [str(row.get("leader")) for row in rows]
            running = {node.name for node in self.running()}
            if leaders and leaders[0] in running:
                return self.node(leaders[0])
            if time.monotonic() > deadline:
                raise LookupError(f"queue {queue} in {vhost} has no running leader: {found}")
            time.sleep(0.5)

    def depths(self, vhost: str) -> dict[str, int]:
        ask = self.running()[0].name
        found = json.loads(
            rabbitmqctl(ask, "list_queues", "-p", vhost, "name", "messages", "--formatter", "json")
        )
        return {str(row["name"]): int(row["messages"]) for row in found}


def wait_connectable(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Connection(url, connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1)
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
