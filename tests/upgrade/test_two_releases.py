"""A rolling upgrade with two releases side by side, then a rollback (docs/operations.md,
"Upgrades"). The previous release (docs/releases.md's newest row, or the commit in
``TEST_UPGRADE_FROM``) runs from its own commit and virtualenv (tests/upgrade/release.py)
against a fresh database at its own revision and a fresh vhost; starts keep arriving while this
checkout's migration runs, while this checkout's worker and beat serve beside the old worker,
and after they are stopped again. Every start is served exactly once: no dead letters, one row
and one vendor session (the simulator's record) per request, each ended by its stop or by the
reaper, whichever release started it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.config import load_settings
from orchestrator.simulator import SimulatorServer
from tests.conftest import (
    AMQP_HOST,
    APP_ID,
    RUN_ID,
    USER_KEY,
    _rabbitmqctl,
    fresh_postgres_database,
    settings_env,
    wait_until,
)
from tests.upgrade import processes
from tests.upgrade.processes import NEW, Process
from tests.upgrade.release import REPO, Release, ReleaseUnavailable, build, previous_release

pytestmark = [
    pytest.mark.broker,
    pytest.mark.postgres,
    pytest.mark.worker,
    pytest.mark.timeout(420),
]
START_EVERY_SECONDS = 0.25
REAPED_AFTER_SECONDS = 3  # max_duration_seconds of every other request
PHASE_SECONDS = 6.0
SETTLE_SECONDS = 60.0  # after the last start: the reaped ones end 3 s after theirs


@pytest.fixture(scope="module")
def old() -> Release:
    """The previous release's environment; a failure to build it fails the test, loudly."""
    pinned = os.environ.get("TEST_UPGRADE_FROM")
    started = time.monotonic()
    try:
        release = build("override", pinned, "?") if pinned else build(*previous_release())
    except ReleaseUnavailable as error:
        pytest.fail(f"cannot build the previous release: {error}")
    print(
        f"\nprevious release {release.version} {release.commit[:12]}: ready in"
        f" {time.monotonic() - started:.1f} s ({release.root})"
    )
    return release


@pytest.fixture
def vhost() -> Iterator[str]:
    name = f"orch_upgrade_{RUN_ID}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@{AMQP_HOST}/{name}"
    finally:
        _rabbitmqctl("delete_vhost", name)


class Traffic:
    """Starts every START_EVERY_SECONDS; each even request is stopped a phase after it became
    active, each odd one is left to the reaper (REAPED_AFTER_SECONDS)."""

    def __init__(self, broker_url: str, database_url: str) -> None:
        self.broker_url = broker_url
        self.conninfo = database_url.replace("+psycopg", "")
        self.sent: list[str] = []
        self.stopped: set[str] = set()
        self.phase = "old"
        self.by_phase: dict[str, int] = {}
        self.errors: list[BaseException] = []
        self._feeding = threading.Event()
        self._done = threading.Event()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._feed,), daemon=True),
            threading.Thread(target=self._guard, args=(self._stop_active,), daemon=True),
        ]

    def _guard(self, loop: Any) -> None:
        try:
            loop()
        except BaseException as error:  # reported by the test, not lost in a thread
            self.errors.append(error)

    def _feed(self) -> None:
        while self._feeding.is_set():
            request_id = f"up-{len(self.sent):04d}"
            stopped_by_us = len(self.sent) % 2 == 0
            processes.start(
                self.broker_url, request_id, 600 if stopped_by_us else REAPED_AFTER_SECONDS
            )
            self.sent.append(request_id)
            self.by_phase[self.phase] = self.by_phase.get(self.phase, 0) + 1
            time.sleep(START_EVERY_SECONDS)

    def _stop_active(self) -> None:
        """Stop each even request in the phase after the one it was first seen active in (at
        once when no more starts come), so a stop often meets a session the other release, or
        the other schema, started."""
        seen_in: dict[str, str] = {}
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            while not self._done.is_set():
                active = conn.execute("SELECT request_id FROM sessions WHERE status = 'active'")
                phase = self.phase
                for (request_id,) in active.fetchall():
                    if int(request_id.removeprefix("up-")) % 2 or request_id in self.stopped:
                        continue
                    first = seen_in.setdefault(request_id, phase)
                    if first != phase or phase == "draining":
                        processes.stop(self.broker_url, request_id)
                        self.stopped.add(request_id)
                time.sleep(0.2)

    def begin(self) -> None:
        self._feeding.set()
        for thread in self._threads:
            thread.start()

    def end_feeding(self) -> None:
        self._feeding.clear()
        self._threads[0].join(timeout=30)

    def close(self) -> None:
        self._feeding.clear()
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=30)


def sessions(conninfo: str) -> list[tuple[str, str, str | None, str | None]]:
    with psycopg.connect(conninfo) as conn:
        return conn.execute(
            "SELECT request_id, status, end_reason, vendor_session_id FROM sessions"
        ).fetchall()


def revision(conninfo: str) -> str:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert row is not None
    return str(row[0])


def test_a_rolling_upgrade_and_a_rollback_serve_every_start_once(
    old: Release, vhost: str, simulator: SimulatorServer, tmp_path: Path
) -> None:
    with fresh_postgres_database("orch_upgrade") as database_url:
        conninfo = database_url.replace("+psycopg", "")
        settings = load_settings(
            state_dir=tmp_path,
            database_url=database_url,
            broker_url=vhost,
            deepbrain_base_url=simulator.base_url,
            deepbrain_app_id=APP_ID,
            deepbrain_user_key=USER_KEY,
            reaper_interval_seconds=0.5,
            reconcile_interval_seconds=3600,
            vendor_timeout_seconds=5,
            orphan_grace_seconds=5,
        )
        env = settings_env(settings)
        if not old.has("orchestrator/config.py", "queue_type"):
            env["ORCHESTRATOR_QUEUE_TYPE"] = "classic"  # the old release's queues
        old_cli = [str(old.orchestrator)]
        running: list[Process] = []

        def launch(release: list[str], command: str, name: str) -> Process:
            state = tmp_path / name
            state.mkdir(exist_ok=True)
            ready = state / "worker.heartbeat" if command == "worker" else None
            argv = [*release, command]
            if command == "worker":  # pods have their own host names; here the node names differ
                argv += ["--concurrency", "8", f"--hostname={name}@%h"]
            process = Process(
                argv,
                {**env, "ORCHESTRATOR_STATE_DIR": str(state)},
                tmp_path / f"{name}.log",
                REPO if release == NEW else tmp_path,
                ready,
            )
            running.append(process)
            return process

        migrated = processes.run([*old_cli, "db", "upgrade"], env, tmp_path)
        assert migrated.returncode == 0, migrated.stderr
        old_head = revision(conninfo)
        traffic = Traffic(vhost, database_url)
        try:
            old_worker = launch(old_cli, "worker", "old-worker")
            old_beat = launch(old_cli, "beat", "old-beat")
            traffic.begin()
            wait_until(
                lambda: sum(s[1] == "active" for s in sessions(conninfo)) >= 3,
                timeout=30,
                what="the previous release serves starts",
            )
            # The migration Job of the new release, while the old workers serve.
            traffic.phase = "migrating"
            migrated = processes.run([*NEW, "db", "upgrade"], env, REPO)
            assert migrated.returncode == 0, migrated.stderr
            new_head = revision(conninfo)
            traffic.phase = "old on the new schema"
            time.sleep(PHASE_SECONDS)
            # The rollout: the new worker beside the old one, the new beat instead of the old.
            traffic.phase = "both"
            new_worker = launch(NEW, "worker", "new-worker")
            old_beat.stop()
            new_beat = launch(NEW, "beat", "new-beat")
            time.sleep(PHASE_SECONDS)
            # On a loaded machine the new beat may start late: the phase lasts until the new
            # worker has served a sweep of its own (the assertion on its log below).
            wait_until(
                lambda: "Task orchestrator.reap_sessions[" in new_worker.log(),
                timeout=SETTLE_SECONDS,
                what="the new worker serves a sweep",
            )
            # The rollback: the new release's pods go, the old beat comes back.
            traffic.phase = "rolled back"
            new_beat.stop()
            new_worker.stop()
            old_beat = launch(old_cli, "beat", "old-beat-again")
            time.sleep(PHASE_SECONDS)
            traffic.end_feeding()
            traffic.phase = "draining"  # the last phase's stops, by the old release
            sent = list(traffic.sent)

            def settled() -> bool:
                rows = sessions(conninfo)
                return len(rows) == len(sent) and all(r[1] in ("ended", "failed") for r in rows)

            deadline = time.monotonic() + SETTLE_SECONDS
            while not settled() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert old_worker.alive(), old_worker.log()[-3000:]
        finally:
            traffic.close()
            for process in reversed(running):
                process.stop()
        logs = "\n".join(f"--- {p.log_path.name}\n{p.log()[-4000:]}" for p in running)
        print(
            f"\n{old.commit[:12]} ({old_head}) -> this checkout ({new_head}):"
            f" {len(sent)} starts by phase {traffic.by_phase}"
        )
        assert not traffic.errors, traffic.errors
        rows = {r[0]: r for r in sessions(conninfo)}
        statuses: dict[str, int] = {}
        for r in rows.values():
            statuses[r[1]] = statuses.get(r[1], 0) + 1
        dead = processes.dead_letters(vhost)
        summary = (
            f"{len(sent)} starts sent, {dead} dead-lettered, {len(sent) - len(rows)} without a"
            f" row, rows by status {statuses}"
        )
        print(summary)
        assert dead == 0, f"{summary}\n{logs}"
        assert sorted(rows) == sorted(sent), summary
        expected = {
            request_id: "USER_CLOSED" if int(request_id[3:]) % 2 == 0 else "MAX_DURATION_REACHED"
            for request_id in sent
        }
        wrong = {k: rows[k][1:3] for k in sent if rows[k][1:3] != ("ended", expected[k])}
        assert not wrong, f"{wrong}\n{logs}"
        vendor = simulator.sessions()
        assert len(vendor) == len(sent), "a request made more than one vendor session"
        assert {v["session_id"] for v in vendor} == {r[3] for r in rows.values()}
        assert all(v["status"] == "ended" and v["ended_by"] == "stop" for v in vendor)
        assert all(traffic.by_phase.get(p, 0) >= 4 for p in ("old on the new schema", "both"))
        for worker in (old_worker, new_worker):  # both releases served starts, stops and sweeps
            served = worker.log()
            for task in ("start_session", "stop_session", "reap_sessions"):
                assert f"Task orchestrator.{task}[" in served, f"{worker.log_path.name}: no {task}"
        print(restart(launch, old_cli, old, old_head, env))


def restart(
    launch: Any, old_cli: list[str], old: Release, old_head: str, env: dict[str, str]
) -> str:
    """A pod of the old release started after the rollback: a release with the window starts
    on the expanded schema; one before it refuses in one line until the schema is downgraded
    to its head (docs/deploy.md, "Upgrades and rollbacks without an outage")."""
    if old.has_window:
        launch(old_cli, "worker", "old-worker-restarted").stop()
        return "the old release's worker restarted on the new schema"
    if not old.has("orchestrator/preflight.py", "def schema_revision("):
        launch(old_cli, "worker", "old-worker-restarted").stop()
        return "the old release checks no schema revision: its worker restarted"
    with pytest.raises(RuntimeError, match="which this program does not know"):
        launch(old_cli, "worker", "old-worker-restarted").stop()
    downgraded = processes.run([*NEW, "db", "downgrade", old_head], env, REPO)
    assert downgraded.returncode == 0, downgraded.stderr
    launch(old_cli, "worker", "old-worker-after-downgrade").stop()
    return f"the old release (before the window) restarted after `db downgrade {old_head}`"
