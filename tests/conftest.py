"""Real parts: a Postgres database and a RabbitMQ vhost made for this run, the simulator as the
vendor, and real worker processes where a test needs the broker in the loop.

Environment (defaults suit this repo's CI machine):
  TEST_POSTGRES_URL  server to create the run's databases on; unset: the local server on
                     127.0.0.1:5432 (user postgres, trust), or, if nothing listens there, an
                     embedded PostgreSQL started for this run (the pytest header says which)
  TEST_AMQP_HOST     RabbitMQ host:port (127.0.0.1:5672), guest/guest; vhosts made with rabbitmqctl
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestrator.config import Settings, load_settings
from orchestrator.db import Database, embedded
from orchestrator.db.migrate import upgrade
from orchestrator.lifecycle import Lifecycle
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from tests.amqp import purge_work_queues

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432"
AMQP_HOST = os.environ.get("TEST_AMQP_HOST", "127.0.0.1:5672")
APP_ID = "test-app-id-7f3a"
USER_KEY = "test-user-key-91bd"
RUN_ID = uuid.uuid4().hex[:8]


_embedded_state_dirs: list[Path] = []


@functools.cache
def _postgres_source() -> str:
    if os.environ.get("TEST_POSTGRES_URL"):
        return "TEST_POSTGRES_URL"
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        return "embedded"
    return "local"


@functools.cache
def postgres_server() -> str:
    """The server this run makes its databases on; an embedded one starts on first use."""
    source = _postgres_source()
    if source == "TEST_POSTGRES_URL":
        return os.environ["TEST_POSTGRES_URL"]
    if source == "local":
        return LOCAL_POSTGRES
    state_dir = Path(tempfile.mkdtemp(prefix="orch-test-pg-"))
    _embedded_state_dirs.append(state_dir)
    with socket.socket() as probe:  # a free port: the fault tests put a TCP proxy in front
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return embedded.acquire(state_dir, tcp_port=port)


def pytest_report_header() -> str:
    return {
        "TEST_POSTGRES_URL": "postgres: the server of TEST_POSTGRES_URL",
        "local": f"postgres: the local server ({LOCAL_POSTGRES})",
        "embedded": "postgres: embedded, started for this run (nothing listens on 127.0.0.1:5432)",
    }[_postgres_source()]


def pytest_unconfigure() -> None:
    for state_dir in _embedded_state_dirs:
        embedded.stop(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


def _admin_conninfo() -> str:
    url = make_url(postgres_server()).set(database="postgres", drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _database_url(name: str) -> str:
    url = make_url(postgres_server()).set(database=name, drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty Postgres database; dropped afterwards."""
    name = f"{prefix}_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _database_url(name)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """The run's Postgres database, migrated to head."""
    with fresh_postgres_database("orch_test") as url:
        upgrade(url)
        yield url


def empty(database: Database) -> None:
    """Every row a test may have written gone, the accounts' health and switches reset."""
    with database.engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE sessions, session_events, event_outbox, early_stops, sweep_leases,"
                " tenants, tenant_usage, tenant_account_usage, wait_estimates"
                " RESTART IDENTITY CASCADE"
            )
        )
        # The vendor's last reported limit outlives the rows that reported it.
        conn.execute(text("UPDATE vendor_accounts SET reported_limit = NULL, reported_at = NULL"))
        # So does an account's health and the operator's switches (the counters were zeroed
        # by the TRUNCATE's trigger).
        conn.execute(
            text(
                "UPDATE vendor_accounts SET limited_cap = NULL, enabled = true, draining = false,"
                " disabled_reason = NULL, consecutive_failures = 0, circuit_open_until = NULL,"
                " circuit_cooldown_seconds = NULL, last_error = NULL, last_error_at = NULL"
            )
        )


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """The run's database, emptied before each test (worker processes need committed rows)."""
    database = Database(database_url, pool_size=5)
    empty(database)
    yield database
    database.dispose()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """A RabbitMQ vhost of this run's own: the contract's queue names, nobody else's messages."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl not found: the broker tests need a local RabbitMQ")
    vhost = f"orch_test_{RUN_ID}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def purge_queues(broker_url: str) -> Callable[[], None]:
    def purge() -> None:
        purge_work_queues(broker_url)

    return purge


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(app_id=APP_ID, user_key=USER_KEY)) as sim:
        yield sim


@pytest.fixture
def simulator(simulator_server: SimulatorServer) -> SimulatorServer:
    """The simulator with no sessions, no faults and default knobs."""
    simulator_server.reset(restore_config=True)
    return simulator_server


@pytest.fixture
def settings_for(
    tmp_path: Path, database_url: str, simulator: SimulatorServer
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "state_dir": tmp_path / "state",
            "database_url": database_url,
            "deepbrain_base_url": simulator.base_url,
            "deepbrain_app_id": APP_ID,
            "deepbrain_user_key": USER_KEY,
            "vendor_timeout_seconds": 5.0,
            "orphan_grace_seconds": 0.0,
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture
def lifecycle(settings_for: Callable[..., Settings], db: Database) -> Iterator[Lifecycle]:
    lc = inline_lifecycle(settings_for())
    yield lc
    lc.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a worker process needs to run with ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "OTEL_"))}
    for name, value in settings.model_dump().items():
        if value is not None:
            plain = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            env[f"ORCHESTRATOR_{name.upper()}"] = str(plain)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """``orchestrator worker`` in a subprocess, its output in a log file."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        *extra: str,
        env_extra: dict[str, str] | None = None,
        bare: bool = False,
    ) -> None:
        """``bare``: the command's own defaults, no ``--concurrency 8`` added."""
        self.settings = settings
        self.log_path = log_path
        self._log = log_path.open("ab")
        heartbeat = settings.state_dir / "worker.heartbeat"
        heartbeat.unlink(missing_ok=True)
        defaults = () if bare else ("--concurrency", "8")
        command = [sys.executable, "-m", "orchestrator.cli", "worker", *defaults, *extra]
        self.process = subprocess.Popen(
            command,
            env={**settings_env(settings), **(env_extra or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not heartbeat.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(settings: Settings, *extra: str, bare: bool = False) -> WorkerProcess:
        log = tmp_path / f"worker-{len(workers)}.log"
        worker = WorkerProcess(settings, log, *extra, bare=bare)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.1,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not met within {timeout} s")
        time.sleep(interval)
