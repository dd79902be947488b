"""Shared parts of the fault suite: settings tuned for fast reconciliation, raw AMQP
publishing, RabbitMQ control, a TCP proxy in front of Postgres, and the checks every fault
test ends with (one row per request, nothing stuck, no vendor session without a row).

The fixtures of tests/conftest.py (``db``, ``simulator``, ``settings_for``, ``start_worker``,
``broker_url`` …) are visible here as well.

``FAULTS_ACCOUNTS=2`` runs the suite with two vendor accounts: the simulator serves
``default`` and ``second`` (each its own keys, cap and sessions) and every worker and
lifecycle of these tests holds both (``second`` from an accounts folder, with the same cap as
``default``), so starts spread over both and every later call must use the row's own key.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import select, text

from orchestrator.config import Settings
from orchestrator.db import Database, SessionEvent, SessionRow
from orchestrator.messaging import Topology
from orchestrator.simulator import SimulatorAccount, SimulatorConfig, SimulatorServer
from tests.amqp import purge_work_queues
from tests.conftest import APP_ID, USER_KEY, WorkerProcess
from tests.faults.tcp_proxy import TcpProxy

# Small intervals so a whole fault-and-recovery cycle fits in seconds (see docs/reliability.md).
ORPHAN_GRACE_SECONDS = 2.0
RECONCILE_INTERVAL_SECONDS = 2.0
START_TIMEOUT_SECONDS = 10.0
# Worst case for "no vendor session without a row": it becomes an orphan candidate after the
# grace, the next reconcile pass (one interval later) stops it; plus scheduling slack (beat
# tick, a busy pass, the stop call itself).
ORPHAN_BOUND_SECONDS = ORPHAN_GRACE_SECONDS + RECONCILE_INTERVAL_SECONDS + 4.0
TERMINAL = ("ended", "failed")
SETTLED = ("active", "ended", "failed")

#: How many vendor accounts the fault suite runs with (1 or 2; ``FAULTS_ACCOUNTS``).
FAULT_ACCOUNTS = int(os.environ.get("FAULTS_ACCOUNTS", "1"))
if FAULT_ACCOUNTS not in (1, 2):
    raise RuntimeError(f"FAULTS_ACCOUNTS must be 1 or 2, got {FAULT_ACCOUNTS}")
SECOND_ACCOUNT = "second"
SECOND_APP_ID = "test-app-id-second-2c81"
SECOND_USER_KEY = "test-user-key-second-5e07"


def two_accounts_simulator() -> SimulatorServer:
    """The simulator serving ``default`` (the suite's usual keys) and ``second``."""
    cap = SimulatorConfig().max_concurrent_sessions
    accounts = [
        SimulatorAccount("default", APP_ID, USER_KEY, max_concurrent_sessions=cap),
        SimulatorAccount(
            SECOND_ACCOUNT, SECOND_APP_ID, SECOND_USER_KEY, max_concurrent_sessions=cap
        ),
    ]
    return SimulatorServer(SimulatorConfig(accounts=accounts))


@pytest.fixture(scope="session")
def simulator_server(simulator_server: SimulatorServer) -> Iterator[SimulatorServer]:
    """The suite's simulator, or with ``FAULTS_ACCOUNTS=2`` one serving two accounts."""
    if FAULT_ACCOUNTS == 1:
        yield simulator_server
        return
    with two_accounts_simulator() as sim:
        yield sim


def second_account_folder(folder: Path, cap: int) -> Path:
    """An accounts folder defining ``second`` (``default`` comes from the usual settings)."""
    folder.mkdir(parents=True, exist_ok=True)
    definition = {"app_id": SECOND_APP_ID, "user_key": SECOND_USER_KEY, "cap": cap}
    (folder / f"{SECOND_ACCOUNT}.json").write_text(json.dumps(definition))
    return folder


@pytest.fixture
def settings_for(settings_for: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    """The suite's settings; with ``FAULTS_ACCOUNTS=2`` they also hold ``second``."""
    if FAULT_ACCOUNTS == 1:
        return settings_for

    def make(**overrides: Any) -> Settings:
        settings = settings_for(**overrides)
        if "accounts_dir" in overrides or settings.deepbrain_app_id is None:
            return settings
        folder = second_account_folder(
            tmp_path / "accounts-second", settings.max_concurrent_sessions
        )
        return settings_for(**{**overrides, "accounts_dir": folder})

    return make


def vendor_capacity(sim: SimulatorServer, cap: int, **knobs: Any) -> SimulatorServer:
    """Give every account the simulator serves room for ``cap`` sessions (and set ``knobs``)."""
    if len(sim.accounts()) == 1 and not sim.config.accounts:
        sim.configure(max_concurrent_sessions=cap, **knobs)
        return sim
    if knobs:
        sim.configure(**knobs)
    for account in sim.accounts():
        sim.configure_account(account.name, max_concurrent_sessions=cap)
    return sim


@pytest.fixture
def fault_settings(
    settings_for: Callable[..., Settings], broker_url: str, tmp_path: Path
) -> Callable[..., Settings]:
    """Settings for a worker process of a fault test; each ``name`` gets its own state dir
    (heartbeat files must not be shared between workers running side by side)."""

    def make(name: str = "worker", **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "state_dir": tmp_path / f"state-{name}",
            "broker_url": broker_url,
            "reaper_interval_seconds": 0.5,
            "reconcile_interval_seconds": RECONCILE_INTERVAL_SECONDS,
            "orphan_grace_seconds": ORPHAN_GRACE_SECONDS,
            "start_timeout_seconds": START_TIMEOUT_SECONDS,
            "stop_retry_seconds": 3.0,
            "vendor_timeout_seconds": 2.0,
            "max_concurrent_sessions": 1000,
        }
        values.update(overrides)
        return settings_for(**values)

    return make


@pytest.fixture
def big_vendor(simulator: SimulatorServer) -> SimulatorServer:
    """The simulator with room for many sessions and no idle timeout (tests stop them)."""
    return vendor_capacity(simulator, 1000, idle_timeout_seconds=None)


@pytest.fixture
def clean_queues(broker_url: str) -> None:
    """Empty the work and dead-letter queues (leftovers of earlier tests, beat ticks)."""
    purge_work_queues(broker_url)


# -- raw AMQP ---------------------------------------------------------------------------


def take_dead_letters(broker_url: str) -> list[Any]:
    """Take every message now in ``orchestrator.dead``, undecoded (raw AMQP messages with
    ``.headers``, ``.body`` and ``.properties``): some of them cannot be decoded at all."""
    found = []
    with Connection(broker_url) as conn:
        channel = conn.default_channel
        Topology().dead_letter_queue(channel).declare()
        while (message := channel.basic_get("orchestrator.dead", no_ack=True)) is not None:
            found.append(message)
    return found


def dead_letter_ids(messages: list[Any]) -> set[str]:
    """Task ids of dead-lettered messages (the ``id`` header, else the correlation id)."""
    ids = set()
    for message in messages:
        task_id = (message.headers or {}).get("id") or message.properties.get("correlation_id")
        ids.add(str(task_id))
    return ids


def queue_depths(broker_url: str) -> dict[str, int]:
    depths = {}
    with Connection(broker_url) as conn:
        channel = conn.channel()
        for queue in ("orchestrator.start", "orchestrator.control"):
            _, count, _ = channel.queue_declare(queue, passive=True)
            depths[queue] = count
    return depths


# -- worker processes ------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def kill_worker(worker: WorkerProcess) -> None:
    """SIGKILL a worker and its child processes: the beat a ``--beat`` worker embeds is a
    child process, and killing the worker alone leaves it running (and publishing)."""
    children = child_pids(worker.process.pid) if worker.process.poll() is None else []
    worker.kill()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- RabbitMQ control -------------------------------------------------------------------


def rabbitmqctl(*args: str, timeout: float = 60) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=timeout)


def rabbit_is_up(broker_url: str) -> bool:
    ping = subprocess.run(
        ["rabbitmq-diagnostics", "-q", "ping"], capture_output=True, timeout=30, check=False
    )
    if ping.returncode != 0:
        return False
    try:
        with Connection(broker_url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
            conn.default_channel.queue_declare("orchestrator.start", passive=True)
    except Exception:
        return False
    return True


def ensure_rabbit_up(broker_url: str, timeout: float = 120) -> None:
    """Start the RabbitMQ application if it is stopped, and wait for a working connection."""
    deadline = time.monotonic() + timeout
    if not rabbit_is_up(broker_url):
        subprocess.run(
            ["rabbitmqctl", "-q", "start_app"], capture_output=True, timeout=120, check=False
        )
    while not rabbit_is_up(broker_url):
        if time.monotonic() > deadline:
            raise RuntimeError("RabbitMQ did not come back: the rest of the suite needs it")
        time.sleep(0.5)


# -- Postgres behind a proxy ------------------------------------------------------------


@pytest.fixture
def pg_proxy(database_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the suite's Postgres server."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy


def via_proxy(database_url: str, proxy: TcpProxy) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(host="127.0.0.1", port=proxy.port)
    return url.render_as_string(hide_password=False)


# -- reading the outcome ----------------------------------------------------------------


def all_rows(db: Database) -> list[SessionRow]:
    with db.transaction() as session:
        found = list(session.scalars(select(SessionRow).order_by(SessionRow.created_at)).all())
        session.expunge_all()
        return found


def rows_by_request(db: Database, request_ids: list[str] | None = None) -> dict[str, SessionRow]:
    """Rows by request_id: all of them, or only those of ``request_ids``."""
    if request_ids is None:
        return {r.request_id: r for r in all_rows(db)}
    with db.transaction() as session:
        found = list(
            session.scalars(select(SessionRow).where(SessionRow.request_id.in_(request_ids)))
        )
        session.expunge_all()
    return {r.request_id: r for r in found}


def event_counts(db: Database, kinds: tuple[str, ...]) -> dict[tuple[str, str], int]:
    """(request_id, kind) → how many ``session_events`` of that kind the request has."""
    with db.transaction() as session:
        found = session.execute(
            select(SessionRow.request_id, SessionEvent.kind)
            .join(SessionEvent, SessionEvent.session_id == SessionRow.id)
            .where(SessionEvent.kind.in_(kinds))
        ).all()
    counts: dict[tuple[str, str], int] = {}
    for request_id, kind in found:
        counts[request_id, kind] = counts.get((request_id, kind), 0) + 1
    return counts


def statuses(db: Database, request_ids: list[str]) -> dict[str, str | None]:
    found = rows_by_request(db)
    return {rid: (found[rid].status if rid in found else None) for rid in request_ids}


def wait_settled(
    db: Database, request_ids: list[str], timeout: float, allowed: tuple[str, ...] = SETTLED
) -> dict[str, SessionRow]:
    """Wait until every request has a row in one of ``allowed``; fail naming the stragglers."""
    deadline = time.monotonic() + timeout
    while True:
        found = rows_by_request(db, request_ids)
        missing = {
            rid: (found[rid].status if rid in found else "no row")
            for rid in request_ids
            if rid not in found or found[rid].status not in allowed
        }
        if not missing:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{len(missing)} request(s) not settled after {timeout} s: {missing}")
        time.sleep(0.25)


def parse_iso(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass
class VendorAudit:
    """The simulator's sessions compared with our rows."""

    owned: dict[str, dict[str, Any]]  # vendor id → simulator session, a row records it
    unowned: list[dict[str, Any]]  # sessions no row records (duplicates, orphans)

    def live_unowned(self) -> list[dict[str, Any]]:
        return [s for s in self.unowned if s["status"] == "active"]

    def longest_unowned_life(self) -> float:
        """Seconds the longest-running unrecorded vendor session lived (until now if alive)."""
        worst = 0.0
        now = time.time()
        for s in self.unowned:
            created = parse_iso(s["created_at"])
            ended = parse_iso(s["ended_at"])
            assert created is not None
            end = ended.timestamp() if ended else now
            worst = max(worst, end - created.timestamp())
        return worst


def audit_vendor(db: Database, sim: SimulatorServer) -> VendorAudit:
    recorded = {r.vendor_session_id for r in all_rows(db) if r.vendor_session_id}
    owned: dict[str, dict[str, Any]] = {}
    unowned: list[dict[str, Any]] = []
    for s in sim.sessions():
        if s["session_id"] in recorded:
            owned[s["session_id"]] = s
        else:
            unowned.append(s)
    return VendorAudit(owned, unowned)


def assert_live_vendor_sessions_have_live_rows(db: Database, sim: SimulatorServer) -> None:
    live_rows = {
        r.vendor_session_id
        for r in all_rows(db)
        if r.vendor_session_id and r.status in ("active", "stopping")
    }
    running = {s["session_id"] for s in sim.sessions("active")}
    assert running <= live_rows, f"vendor sessions running with no live row: {running - live_rows}"


def wait_no_unowned_vendor_sessions(
    db: Database, sim: SimulatorServer, timeout: float = ORPHAN_BOUND_SECONDS + 2
) -> VendorAudit:
    """Wait until no unrecorded vendor session runs; then check none lived past the bound."""
    deadline = time.monotonic() + timeout
    while True:
        audit = audit_vendor(db, sim)
        if not audit.live_unowned():
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"vendor sessions without a row still running after {timeout} s: "
                f"{[s['session_id'] for s in audit.live_unowned()]}"
            )
        time.sleep(0.2)
    return audit


def assert_rows_are_final_and_explained(
    rows: dict[str, SessionRow], request_ids: list[str]
) -> None:
    for rid in request_ids:
        r = rows[rid]
        assert r.status in SETTLED, (rid, r.status)
        if r.status == "failed":
            assert r.error_code and r.error_message, (rid, r.error_code, r.error_message)
            assert r.livekit_token is None
        if r.status == "ended":
            assert r.end_reason, rid
            assert r.livekit_token is None
        if r.status == "active":
            assert r.vendor_session_id and r.livekit_token, rid


def table_dump(db: Database, table: str, exclude: tuple[str, ...] = ()) -> str:
    """Every row of ``table`` as text (JSON), for secret searches."""
    with db.engine.connect() as conn:
        found = conn.execute(text(f"SELECT * FROM {table}")).mappings().all()
    return "\n".join(
        json.dumps({k: v for k, v in r.items() if k not in exclude}, default=str) for r in found
    )
