"""Real parts for the benchmarks: a Postgres database and a RabbitMQ vhost of the run's own,
the simulator and the workers as subprocesses, and clean-up that happens even on failure.

Every resource is entered on a :class:`contextlib.ExitStack` owned by the runner, so an
exception, Ctrl-C or SIGTERM drops the databases, deletes the vhosts and ends the processes.
Child processes also get ``PR_SET_PDEATHSIG``: if the runner is killed with SIGKILL they die too,
and the next run drops the databases and vhosts whose owner pid is gone (``sweep_stale``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.engine import make_url

POSTGRES_SERVER = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
AMQP_HOST = os.environ.get("BENCH_AMQP_HOST", "127.0.0.1:5672")
APP_ID = "bench-app-id-5c2e"
USER_KEY = "bench-user-key-a71f"
PREFIX = "orch_bench"
REPO_ROOT = Path(__file__).resolve().parent.parent

# -- small helpers -----------------------------------------------------------------------------


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


def _pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP become KeyboardInterrupt so every ``finally`` and ExitStack runs."""

    def raise_interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)


# -- the machine ---------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _command_output(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def machine_info() -> dict[str, Any]:
    cpu = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    pg_version = ""
    with contextlib.suppress(Exception), psycopg.connect(admin_conninfo()) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        pg_version = str(row[0]) if row else ""
    rabbit = _command_output("rabbitmqctl", "-q", "version")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu.group(1).strip() if cpu else platform.processor(),
        "memory_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": pg_version,
        "rabbitmq": rabbit,
        "loadavg_at_start": _read("/proc/loadavg").split()[:3],
    }


def loadavg() -> list[str]:
    return _read("/proc/loadavg").split()[:3]


def cpu_busy_fraction() -> Callable[[], float]:
    """Start a whole-machine CPU meter; the returned function gives the busy share since."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total0, idle0 = sample()

    def busy() -> float:
        total1, idle1 = sample()
        total = total1 - total0
        return 1.0 - (idle1 - idle0) / total if total > 0 else 0.0

    return busy


# -- Postgres ------------------------------------------------------------------------------------


def admin_conninfo() -> str:
    url = make_url(POSTGRES_SERVER).set(database="postgres", drivername="postgresql")
    return url.render_as_string(hide_password=False)


def database_url(name: str) -> str:
    url = make_url(POSTGRES_SERVER).set(database=name, drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def plain_conninfo(sqlalchemy_url: str) -> str:
    """The psycopg conninfo of a SQLAlchemy URL."""
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def resource_name(tag: str) -> str:
    return f"{PREFIX}_{os.getpid()}_{tag}_{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def postgres_database(tag: str, *, migrate: bool = True) -> Iterator[str]:
    """A new database migrated to head; dropped afterwards (WITH FORCE), whatever happened."""
    from orchestrator.db.migrate import upgrade

    name = resource_name(tag)
    with psycopg.connect(admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = database_url(name)
        if migrate:
            upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- RabbitMQ ------------------------------------------------------------------------------------


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def wait_for_rabbit(timeout: float = 120.0) -> None:
    """Wait until RabbitMQ answers (on a shared machine, a test may have stopped it a while)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            rabbitmqctl("list_vhosts")
            return
        except (subprocess.SubprocessError, OSError):
            if time.monotonic() > deadline:
                raise
            log("RabbitMQ is not answering; waiting")
            time.sleep(5)


@contextlib.contextmanager
def rabbit_vhost(tag: str) -> Iterator[str]:
    """A vhost of this run's own (guest may use it); deleted afterwards."""
    if shutil.which("rabbitmqctl") is None:
        raise RuntimeError("rabbitmqctl not found: the benchmarks need a local RabbitMQ")
    wait_for_rabbit()
    vhost = resource_name(tag)
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            wait_for_rabbit(60)  # stopped by someone else's test: delete once it is back
            rabbitmqctl("delete_vhost", vhost)


def sweep_stale() -> list[str]:
    """Drop databases and vhosts left by an earlier run that was killed (its pid is gone)."""
    removed: list[str] = []
    pattern = re.compile(rf"^{PREFIX}_(\d+)_")
    with contextlib.suppress(Exception), psycopg.connect(admin_conninfo(), autocommit=True) as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
        for name in names:
            match = pattern.match(name)
            if match and not _pid_alive(int(match.group(1))):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                removed.append(name)
    with contextlib.suppress(Exception):
        for vhost in rabbitmqctl("list_vhosts").split():
            match = pattern.match(vhost)
            if match and not _pid_alive(int(match.group(1))):
                rabbitmqctl("delete_vhost", vhost)
                removed.append(vhost)
    return removed


# -- processes -----------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/PID/task/*/children)."""
    pids = [pid]
    index = 0
    while index < len(pids):
        current = pids[index]
        index += 1
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = _read(str(task / "children")).split()
            pids.extend(int(c) for c in children if int(c) not in pids)
    return pids


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants, in bytes (0 once gone)."""
    total = 0
    for p in process_tree(pid):
        match = re.search(r"^VmRSS:\s*(\d+) kB", _read(f"/proc/{p}/status"), re.M)
        if match:
            total += int(match.group(1)) * 1024
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        stat = _read(f"/proc/{p}/stat")
        if not stat:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


class BrokerOutage(RuntimeError):
    """RabbitMQ went away during a measurement: the figures are void (run.py retries once)."""


@dataclass
class ManagedProcess:
    """A subprocess with its output in a log file; ``stop()`` is idempotent."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False)
    peak_rss: int = 0
    #: When the process said it was ready (epoch seconds), for rates over a whole drain.
    ready_at: float | None = None
    _sampler: threading.Thread | None = field(default=None, init=False)
    _sampling: threading.Event = field(default_factory=threading.Event, init=False)
    _outage_reported: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            preexec_fn=_pdeathsig,  # noqa: PLW1509 - only sets PR_SET_PDEATHSIG
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def sample_rss(self, every: float = 0.2) -> None:
        """Track the peak RSS of the process tree in a background thread."""

        def loop() -> None:
            while not self._sampling.wait(every):
                self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))

        self._sampler = threading.Thread(target=loop, name=f"rss-{self.name}", daemon=True)
        self._sampler.start()

    def broker_outage(self) -> str | None:
        """The worker's log line if it lost the broker (someone stopped RabbitMQ meanwhile)."""
        with self.log_path.open("rb") as log_file:
            log_file.seek(self._log_offset)
            text = log_file.read().decode(errors="replace")
        for line in text.splitlines():
            if "Connection to broker lost" in line or "Cannot connect to amqp" in line:
                return line.strip()
        return None

    def stop(self, timeout: float = 20.0) -> None:
        self._sampling.set()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    for pid in reversed(process_tree(self.pid)):
                        os.kill(pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()
        outage = self.broker_outage() if self.name.startswith(("worker", "bare")) else None
        if outage and not self._outage_reported:
            self._outage_reported = True
            raise BrokerOutage(f"{self.name} lost the broker during the measurement: {outage}")


def python_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "OTEL_"))}
    env.update({"PYTHONUNBUFFERED": "1", "OTEL_SDK_DISABLED": "true"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


# -- the simulator -------------------------------------------------------------------------------


class Simulator:
    """``benchmarks.simproc`` (the simulator, logging at WARNING) in its own process, so the
    fake vendor never competes for the benchmark's or the worker's GIL."""

    def __init__(self, work_dir: Path, **config: Any) -> None:
        # With ``accounts`` every account has its own keys (top-level ones are refused).
        keys = {} if "accounts" in config else {"app_id": APP_ID, "user_key": USER_KEY}
        knobs = {**keys, **config}
        ready = work_dir / f"simulator-{uuid.uuid4().hex[:6]}.url"
        self.proc = ManagedProcess(
            "simulator",
            [sys.executable, "-m", "benchmarks.simproc", json.dumps(knobs), str(ready)],
            python_env({}),
            work_dir / "simulator.log",
        )
        try:
            wait_for(lambda: ready.exists() or not self.proc.alive(), 30, "simulator start-up")
            if not self.proc.alive():
                raise RuntimeError(f"simulator exited:\n{self.proc.log_tail()}")
            self.base_url = ready.read_text().strip()
        except BaseException:
            self.proc.stop()
            raise
        self._http = httpx.Client(base_url=self.base_url, timeout=30)

    def configure(self, **knobs: Any) -> None:
        self._http.post("/_sim/config", json=knobs).raise_for_status()

    def reset(self) -> None:
        self._http.post("/_sim/reset", json={}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        reply = self._http.get("/_sim/stats")
        reply.raise_for_status()
        data: dict[str, Any] = reply.json()
        return data

    def stop(self) -> None:
        self._http.close()
        self.proc.stop()


# -- workers -------------------------------------------------------------------------------------


def orchestrator_env(
    *,
    state_dir: Path,
    database_url: str,
    broker_url: str,
    simulator_url: str,
    **overrides: Any,
) -> dict[str, str]:
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "database_url": database_url,
        "broker_url": broker_url,
        "deepbrain_base_url": simulator_url,
        "deepbrain_app_id": APP_ID,
        "deepbrain_user_key": USER_KEY,
        "max_concurrent_sessions": 100_000,  # P1-P4 measure the pipeline, not admission
        "reconcile_interval_seconds": 3600,
        "vendor_timeout_seconds": 30,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return {f"ORCHESTRATOR_{k.upper()}": str(v) for k, v in values.items()}


def start_orchestrator_worker(
    work_dir: Path,
    env: Mapping[str, str],
    *,
    concurrency: int,
    pool: str = "threads",
    beat: bool = False,
    name: str = "worker",
    queues: str | None = None,
) -> ManagedProcess:
    """``python -m orchestrator.cli worker`` ready to consume (its heartbeat file exists)."""
    state_dir = Path(env["ORCHESTRATOR_STATE_DIR"])
    state_dir.mkdir(parents=True, exist_ok=True)
    heartbeat = state_dir / "worker.heartbeat"
    heartbeat.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--hostname={name}-{uuid.uuid4().hex[:4]}@%h",
    ]
    if queues:
        command.append(f"--queues={queues}")
    if beat:
        command.append("--beat")
    proc = ManagedProcess(name, command, python_env(env), work_dir / f"{name}.log")
    try:
        wait_for(lambda: heartbeat.exists() or not proc.alive(), 60, f"{name} start-up")
        if not proc.alive():
            raise RuntimeError(f"{name} exited:\n{proc.log_tail()}")
        proc.ready_at = heartbeat.stat().st_mtime  # first touched once connected
    except BaseException:
        proc.stop()
        raise
    proc.sample_rss()
    profile(work_dir, proc)
    return proc


#: Set by ``run.py --profile``: the py-spy binary that records every orchestrator worker.
PY_SPY: str | None = None
PROFILES: list[Path] = []


def profile(work_dir: Path, proc: ManagedProcess) -> None:
    """Record ``proc`` with py-spy (collapsed stacks, all threads, idle frames left out) until
    it exits; the file is listed in ``PROFILES``."""
    if PY_SPY is None:
        return
    out = work_dir / f"{proc.name}-{proc.pid}.collapsed"
    spy = ManagedProcess(
        f"py-spy-{proc.name}",
        [
            PY_SPY,
            "record",
            "--pid",
            str(proc.pid),
            "--format",
            "raw",
            "--rate",
            "200",
            "--output",
            str(out),
            "--nonblocking",
            "--gil",
        ],
        python_env({}),
        work_dir / "py-spy.log",
    )
    PROFILES.append(out)
    original_stop = proc.stop

    def stop_both(timeout: float = 20.0) -> None:
        original_stop(timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.process.wait(timeout=30)
        spy.stop()

    proc.stop = stop_both  # type: ignore[method-assign]


def start_bare_worker(
    work_dir: Path,
    broker_url: str,
    *,
    concurrency: int,
    expected: int,
    done_file: Path,
    pool: str = "threads",
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """The bare Celery baseline worker (``benchmarks.bare_app``), same settings as ours;
    ``env`` adds variables (``bench.io`` needs ``BENCH_DATABASE_URL`` and the vendor's)."""
    ready = work_dir / "bare.ready"
    ready.unlink(missing_ok=True)
    env = python_env(
        {
            **(env or {}),
            "BENCH_BROKER_URL": broker_url,
            "BENCH_EXPECTED": str(expected),
            "BENCH_DONE_FILE": str(done_file),
            "BENCH_READY_FILE": str(ready),
        }
    )
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "benchmarks.bare_app",
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        "--queues=bench.bare",
        "--loglevel=WARNING",
        f"--hostname=bare-{uuid.uuid4().hex[:4]}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    proc = ManagedProcess("bare-worker", command, env, work_dir / "bare-worker.log")
    try:
        wait_for(lambda: ready.exists() or not proc.alive(), 60, "bare worker start-up")
        if not proc.alive():
            raise RuntimeError(f"bare worker exited:\n{proc.log_tail()}")
        proc.ready_at = float(ready.read_text())
    except BaseException:
        proc.stop()
        raise
    proc.sample_rss()
    return proc


# -- the run's context ---------------------------------------------------------------------------


@dataclass
class BenchContext:
    """What every benchmark gets: the exit stack (register clean-ups on it), a scratch folder,
    whether to run the quick variant, where to put artefacts, and which repetition this is
    (1-based, of ``repetitions``)."""

    stack: contextlib.ExitStack
    work_dir: Path
    results_dir: Path
    quick: bool
    repetition: int = 1
    repetitions: int = 1

    def __post_init__(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def database(self, tag: str) -> str:
        return self.stack.enter_context(postgres_database(tag))

    def vhost(self, tag: str) -> str:
        return self.stack.enter_context(rabbit_vhost(tag))

    def simulator(self, **config: Any) -> Simulator:
        sim = Simulator(self.work_dir, **config)
        self.stack.callback(sim.stop)
        return sim

    def managed(self, proc: ManagedProcess) -> ManagedProcess:
        self.stack.callback(proc.stop)
        return proc

    def scratch(self, name: str) -> Path:
        path = self.work_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
