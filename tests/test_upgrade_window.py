"""The compatibility window: a worker or beat starts on its own head or on a later revision
whose ``schema_compatibility`` row serves it; anything else is one line
(tests/test_cli_errors.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory

from orchestrator.config import Settings
from orchestrator.db.compatibility import TABLE
from orchestrator.db.migrate import alembic_config, downgrade, upgrade
from orchestrator.preflight import NotMigrated, schema_revision
from tests.conftest import WorkerProcess, fresh_postgres_database, settings_env, wait_until
from tests.test_cli_errors import one_line, orchestrator

pytestmark = pytest.mark.postgres
FUTURE = "9000_from_a_later_release"
BEAT_SECONDS = 4.0
BEAT_START_TIMEOUT = 60.0


def head(url: str) -> str:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head() or ""


@pytest.fixture
def migrated() -> Iterator[str]:
    with fresh_postgres_database("orch_window") as url:
        upgrade(url)
        yield url


def later_release(url: str, *, down: str | None, oldest: str) -> None:
    """What a later release's migration leaves: its revision stamped and its row recorded."""
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {TABLE} (revision, down_revision, oldest_served_revision)"
            " VALUES (%s, %s, %s)",
            (FUTURE, down, oldest),
        )
        conn.execute("UPDATE alembic_version SET version_num = %s", (FUTURE,))


def test_own_head_is_accepted(migrated: str) -> None:
    assert schema_revision(migrated) == head(migrated)


def test_a_later_revision_that_serves_this_head_is_accepted(migrated: str) -> None:
    later_release(migrated, down=head(migrated), oldest=head(migrated))
    assert schema_revision(migrated) == f"{FUTURE} (serves this release's {head(migrated)})"


def test_a_window_reaching_back_past_this_head_is_accepted(migrated: str) -> None:
    later_release(migrated, down=head(migrated), oldest="0004")
    assert schema_revision(migrated).startswith(FUTURE)


@pytest.mark.parametrize(
    ("down", "oldest", "why"),
    [
        ("HEAD", FUTURE, f"it serves releases from revision {FUTURE} on"),
        ("8999_another_branch", "0004", "its recorded history does not pass through revision"),
        (None, "HEAD", "its recorded history does not pass through revision"),
    ],
)
def test_a_later_revision_that_does_not_serve_this_head_is_refused(
    migrated: str, down: str | None, oldest: str, why: str
) -> None:
    own = head(migrated)
    later_release(
        migrated, down=own if down == "HEAD" else down, oldest=own if oldest == "HEAD" else oldest
    )
    with pytest.raises(NotMigrated, match=why) as refused:
        schema_revision(migrated)
    assert str(refused.value).startswith(f"the database is at revision {FUTURE}, which this")


def test_a_later_revision_without_a_row_is_refused(migrated: str) -> None:
    with psycopg.connect(migrated.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = %s", (FUTURE,))
    with pytest.raises(NotMigrated, match="it declares no compatibility window"):
        schema_revision(migrated)


def test_an_older_revision_is_refused(migrated: str) -> None:
    downgrade(migrated, "0004")
    with pytest.raises(NotMigrated, match="run `orchestrator db upgrade`"):
        schema_revision(migrated)


def test_downgrade_of_0005_removes_the_table(migrated: str) -> None:
    downgrade(migrated, "0004")
    with psycopg.connect(migrated.replace("+psycopg", ""), autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone() == (None,)
    upgrade(migrated)
    assert schema_revision(migrated) == head(migrated)


def test_worker_and_beat_refuse_in_one_line_and_check_accepts_the_window(
    settings_for: Callable[..., Settings], migrated: str
) -> None:
    env = settings_env(settings_for(database_url=migrated, orphan_grace_seconds=5.0))
    own = head(migrated)
    later_release(migrated, down=own, oldest=FUTURE)
    for command in ("worker", "beat"):
        line = one_line(orchestrator(command, env=env))
        assert line == (
            f"Error: the database is at revision {FUTURE}, which this program does not know"
            f" (a newer release migrated it) and it serves releases from revision {FUTURE} on;"
            f" this program needs {own}"
        )
    with psycopg.connect(migrated.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"UPDATE {TABLE} SET oldest_served_revision = %s", (own,))
    checked = orchestrator("check", "--no-vendor", env=env)
    assert f"database: ok, at revision {FUTURE} (serves this release's {own})" in checked.stdout


@pytest.mark.broker
@pytest.mark.worker
def test_worker_and_beat_start_on_a_later_revision_that_serves_them(
    settings_for: Callable[..., Settings], migrated: str, broker_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url=migrated, broker_url=broker_url, orphan_grace_seconds=5.0)
    later_release(migrated, down=head(migrated), oldest=head(migrated))
    worker = WorkerProcess(settings, tmp_path / "worker.log")  # waits for its heartbeat
    try:
        assert worker.process.poll() is None, worker.log()
    finally:
        worker.stop()
    log_path = tmp_path / "beat.log"
    with log_path.open("w") as log:
        beat = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "beat"],
            env={**settings_env(settings), "ORCHESTRATOR_STATE_DIR": str(tmp_path / "beat")},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def started() -> bool:
        output = log_path.read_text()
        return beat.poll() is not None or any(
            line in output for line in ("Scheduler: Sending due task", "beat: Starting")
        )

    try:
        # A refusal exits at once (the test above); a loaded machine may take a while to start.
        wait_until(started, timeout=BEAT_START_TIMEOUT, what="beat's start line")
        time.sleep(BEAT_SECONDS)
        assert beat.poll() is None, log_path.read_text()
    finally:
        beat.terminate()
        beat.wait(timeout=30)
    output = log_path.read_text()
    assert "Scheduler: Sending due task" in output or "beat: Starting" in output, output
