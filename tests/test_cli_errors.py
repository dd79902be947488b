"""Every infrastructure error is one line at the command line, in a real process: the exit
code, the line, no traceback; `--debug` or ORCHESTRATOR_LOG_LEVEL=DEBUG shows the traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from orchestrator.config import Settings
from orchestrator.simulator import SimulatorAccount, SimulatorConfig, SimulatorServer
from tests.conftest import APP_ID, USER_KEY, fresh_postgres_database, settings_env

pytestmark = pytest.mark.postgres
UNREACHABLE_DATABASE = "postgresql+psycopg://orch:db-secret-pw@127.0.0.1:1/orch"


def orchestrator(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The single stderr line of a command that failed with ``code`` (log records, JSON lines
    such as Alembic's "Context impl PostgresqlImpl.", are not part of the error)."""
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and not (line.startswith("{") and '"level": "' in line)
    ]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture
def empty_database() -> Iterator[str]:
    with fresh_postgres_database("orch_empty") as url:
        yield url


@pytest.fixture
def env_for(settings_for: Callable[..., Settings], tmp_path: Path) -> Callable[..., dict[str, str]]:
    def make(**overrides: object) -> dict[str, str]:
        # An orphan grace the consistency check of worker and check accepts.
        return settings_env(settings_for(**{"orphan_grace_seconds": 5.0, **overrides}))

    return make


def test_malformed_database_url(tmp_path: Path) -> None:
    env = {
        "ORCHESTRATOR_DATABASE_URL": "orch:db-secret-pw@db/orch",
        "ORCHESTRATOR_STATE_DIR": str(tmp_path),
    }
    line = one_line(orchestrator("sessions", env=env))
    assert line.startswith("Error: ORCHESTRATOR_DATABASE_URL: ")
    assert "db-secret-pw" not in line


def test_unreachable_database(tmp_path: Path) -> None:
    env = {
        "ORCHESTRATOR_DATABASE_URL": UNREACHABLE_DATABASE,
        "ORCHESTRATOR_STATE_DIR": str(tmp_path),
    }
    for command in (["sessions"], ["status", "r1"], ["db", "upgrade"]):
        line = one_line(orchestrator(*command, env=env))
        assert line.startswith("Error: database (ORCHESTRATOR_DATABASE_URL): "), line
        assert "port 1 failed" in line and "db-secret-pw" not in line


def test_database_not_migrated_says_to_run_db_upgrade(
    env_for: Callable[..., dict[str, str]], empty_database: str
) -> None:
    env = env_for(database_url=empty_database)
    for command in (["sessions"], ["status", "r1"], ["sessions", "--json"]):
        line = one_line(orchestrator(*command, env=env))
        assert line.endswith("run `orchestrator db upgrade`"), line
    # The worker checks before it starts (a task would fail on every message otherwise).
    line = one_line(orchestrator("worker", env=env))
    assert line == "Error: the database has no tables yet: run `orchestrator db upgrade`"
    checked = orchestrator("check", "--no-vendor", env=env)
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert "database: FAILED, the database has no tables yet" in checked.stdout


def test_database_of_an_unknown_revision(
    env_for: Callable[..., dict[str, str]], empty_database: str
) -> None:
    with psycopg.connect(empty_database.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")
    env = env_for(database_url=empty_database)
    line = one_line(orchestrator("worker", env=env))
    assert "9999_from_the_future, which this program does not know" in line
    line = one_line(orchestrator("db", "upgrade", env=env))
    assert line == "Error: migration: Can't locate revision identified by '9999_from_the_future'"


def test_unknown_alembic_revision(env_for: Callable[..., dict[str, str]]) -> None:
    line = one_line(orchestrator("db", "upgrade", "nosuchrev", env=env_for()))
    assert line == "Error: migration: Can't locate revision identified by 'nosuchrev'"


@pytest.mark.parametrize("url", ["foo://", "amqp://a//;redis-ish://b", "amqp://h:notaport//"])
def test_malformed_broker_url(url: str, tmp_path: Path) -> None:
    env = {"ORCHESTRATOR_BROKER_URL": url, "ORCHESTRATOR_STATE_DIR": str(tmp_path)}
    line = one_line(orchestrator("enqueue", "--avatar-id", "a", env=env))
    assert line.startswith("Error: ORCHESTRATOR_BROKER_URL: "), line


def test_unreachable_broker(tmp_path: Path) -> None:
    env = {
        "ORCHESTRATOR_BROKER_URL": "amqp://orch:mq-secret-pw@127.0.0.1:1//",
        "ORCHESTRATOR_STATE_DIR": str(tmp_path),
    }
    line = one_line(orchestrator("stop", "--request-id", "r1", env=env))
    assert line.startswith("Error: broker (ORCHESTRATOR_BROKER_URL): could not publish"), line
    assert "mq-secret-pw" not in line


@pytest.mark.broker
def test_check_names_an_unreachable_vendor(
    env_for: Callable[..., dict[str, str]], broker_url: str, simulator: SimulatorServer
) -> None:
    env = env_for(broker_url=broker_url, deepbrain_base_url="http://127.0.0.1:1")
    done = orchestrator("check", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("database: ok, at revision ")
    assert lines[1].startswith("broker: ok")
    assert lines[2].startswith(
        "vendor default: FAILED, DeepBrain API (ORCHESTRATOR_DEEPBRAIN_BASE_URL): "
    )
    assert "VENDOR_UNREACHABLE" in lines[2]

    healthy = orchestrator("check", env=env_for(broker_url=broker_url))
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.splitlines()[2] == "vendor default: ok, 0 live sessions"


@pytest.mark.broker
def test_check_asks_the_vendor_with_every_accounts_key(
    env_for: Callable[..., dict[str, str]], broker_url: str, tmp_path: Path
) -> None:
    accounts = [
        SimulatorAccount("default", APP_ID, USER_KEY),
        SimulatorAccount("second", "app-second", "key-second-real"),
    ]
    folder = tmp_path / "accounts"
    folder.mkdir()
    second = folder / "second.json"
    with SimulatorServer(SimulatorConfig(accounts=accounts)) as sim:
        # A mistyped key on one account fails that account's line alone, never showing it.
        second.write_text(json.dumps({"app_id": "app-second", "user_key": "key-second-typo"}))
        env = env_for(broker_url=broker_url, deepbrain_base_url=sim.base_url, accounts_dir=folder)
        done = orchestrator("check", env=env)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        lines = done.stdout.splitlines()
        assert lines[2] == "vendor default: ok, 0 live sessions", lines
        assert lines[3].startswith("vendor second: FAILED, "), lines
        assert "key-second-typo" not in done.stdout + done.stderr

        second.write_text(json.dumps({"app_id": "app-second", "user_key": "key-second-real"}))
        healthy = orchestrator("check", env=env)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert healthy.stdout.splitlines()[2:] == [
            "vendor default: ok, 0 live sessions",
            "vendor second: ok, 0 live sessions",
        ]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = {
        "ORCHESTRATOR_DATABASE_URL": UNREACHABLE_DATABASE,
        "ORCHESTRATOR_STATE_DIR": str(tmp_path),
    }
    for args, extra in (
        (["--debug", "sessions"], {}),
        (["sessions"], {"ORCHESTRATOR_LOG_LEVEL": "debug"}),
    ):
        done = orchestrator(*args, env={**env, **extra})
        assert done.returncode == 1
        assert "Traceback" in done.stderr and "OperationalError" in done.stderr
