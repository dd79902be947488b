"""An earlier release's worker, built from its commit: the source from the clone's own history
(``git archive``; a shallow clone fails with what to run), a virtualenv from that commit's own
lock and pyproject, installed from the pip cache. Built once per commit and kept under
``TEST_RELEASE_CACHE`` (default ``~/.cache/orchestrator-ci/releases``)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RELEASES = REPO / "docs" / "releases.md"
LOCK = "docker/requirements.lock"
BUILD_TIMEOUT_SECONDS = 900
ROW = re.compile(r"^\|\s*(v[\w.]+)\s*\|\s*`?([0-9a-f]{7,40})`?\s*\|\s*`?(\w+)`?\s*\|")


class ReleaseUnavailable(Exception):
    """The earlier release cannot be built here; the message says why and what to do."""


@dataclass(frozen=True)
class Release:
    version: str
    commit: str  # full id
    schema_head: str
    root: Path  # the cache folder of this commit

    @property
    def orchestrator(self) -> Path:
        """The release's own console script (not ``python -m``: the current directory must not
        shadow the installed package)."""
        return self.root / "venv" / "bin" / "orchestrator"

    def has(self, path: str, text: str) -> bool:
        """Whether ``path`` exists at this release's commit and contains ``text``."""
        try:
            return text in git("show", f"{self.commit}:{path}")
        except ReleaseUnavailable:
            return False

    @property
    def has_window(self) -> bool:
        """Whether its worker starts on a later revision that serves it (migration 0005 on)."""
        return self.has("orchestrator/db/compatibility.py", "def served(")


def git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise ReleaseUnavailable(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def recorded_releases() -> list[tuple[str, str, str]]:
    """(version, commit, schema head) of each row of docs/releases.md's table, oldest first."""
    rows = [m.groups() for line in RELEASES.read_text().splitlines() if (m := ROW.match(line))]
    if not rows:
        raise ReleaseUnavailable(f"{RELEASES} lists no release")
    return [(v, c, h) for v, c, h in rows]


def resolve(commit: str) -> str:
    """The full id of ``commit`` from the clone's history, or why it is not there."""
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 0:
        return done.stdout.strip()
    shallow = git("rev-parse", "--is-shallow-repository").strip() == "true"
    raise ReleaseUnavailable(
        f"commit {commit} (the previous release, docs/releases.md) is not in this clone"
        + (
            ": it is shallow; run `git fetch --unshallow` (or clone with full history)"
            if shallow
            else "; fetch it (`git fetch origin`)"
        )
    )


def previous_release() -> tuple[str, str, str]:
    """The newest recorded release: the one this code's upgrade starts from."""
    return recorded_releases()[-1]


def build(version: str, commit: str, schema_head: str) -> Release:
    """The release's virtualenv, built unless the cache has it (one build at a time)."""
    full = resolve(commit)
    cache = Path(
        os.environ.get("TEST_RELEASE_CACHE")
        or Path.home() / ".cache" / "orchestrator-ci" / "releases"
    )
    release = Release(version, full, schema_head, cache / full)
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f"{full}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (release.root / ".built").exists():
            _build(release)
    return release


def _build(release: Release) -> None:
    started = time.monotonic()
    # Built where it stays (a venv's scripts name its path); ``.built`` marks it complete.
    staging = release.root
    shutil.rmtree(staging, ignore_errors=True)
    source = staging / "src"
    source.mkdir(parents=True)
    archive = staging / "src.tar"
    git("archive", "--format=tar", "-o", str(archive), release.commit)
    with tarfile.open(archive) as tar:
        tar.extractall(source, filter="data")
    archive.unlink()
    constraints = staging / "constraints.txt"
    constraints.write_text(
        "\n".join(
            line.rstrip(" \\")
            for line in (source / LOCK).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "--hash"))
        )
        + "\n"
    )
    venv = staging / "venv"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "install", "-c", str(constraints), "setuptools", "wheel"],
        # Not editable: the installed package must not depend on the source folder's layout.
        [*pip, "install", "--no-build-isolation", "-c", str(constraints), str(source)],
    ]
    for step in steps:
        done = subprocess.run(
            step,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
            cwd=staging,
        )
        if done.returncode != 0:
            raise ReleaseUnavailable(
                f"building release {release.version} ({release.commit[:12]}) failed at"
                f" {' '.join(step[:4])}…: {done.stderr.strip()[-2000:]}"
            )
    shutil.rmtree(source / "tests", ignore_errors=True)
    (staging / ".built").write_text(f"{time.monotonic() - started:.1f} s\n")


def main() -> None:
    """``python -m tests.upgrade.release [COMMIT]``: build (or find) a release's environment."""
    if len(sys.argv) > 1:
        release = build("scratch", sys.argv[1], "?")
    else:
        release = build(*previous_release())
    print(release.root)


if __name__ == "__main__":
    main()
