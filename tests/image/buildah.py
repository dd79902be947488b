"""Containers from the CI image, run with buildah as a pod would run them: chroot isolation,
the host's network, uid/gid 10001, the given environment and nothing else.

Storage and image are docker/ci-image.sh's (its ORCHESTRATOR_CI_* settings, asked from the
script itself), so the tests run exactly what that script built.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "ci-image.sh"


def _script_settings() -> dict[str, str]:
    """ORCHESTRATOR_CI_* as docker/ci-image.sh resolves them (its defaults, or the env's)."""
    out = subprocess.run(
        ["bash", str(SCRIPT), "--print-env"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


_SETTINGS = _script_settings()
STORAGE = _SETTINGS["ORCHESTRATOR_CI_STORAGE"]
RUNROOT = _SETTINGS["ORCHESTRATOR_CI_RUNROOT"]
IMAGE = _SETTINGS["ORCHESTRATOR_CI_IMAGE"]
USER = "10001:10001"


def buildah(*args: str, timeout: float = 120) -> str:
    """Run buildah on the CI storage; its stdout, or an error with its stderr."""
    command = ["buildah", "--root", STORAGE, "--runroot", RUNROOT, "--storage-driver", "vfs"]
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def image_config(image: str = IMAGE) -> dict[str, Any]:
    """The image's OCI config (Entrypoint, Cmd, Env, User...)."""
    inspected = json.loads(buildah("inspect", "--type", "image", image))
    config: dict[str, Any] = inspected["OCIv1"]["config"]
    return config


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The parent pid is the second field after the parenthesised command name.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class Container:
    """A working container of the image: its own root filesystem (so its own /tmp, shared
    by every command run in it, as a pod's emptyDir is shared by the container and its exec
    probes), processes run in it one `buildah run` each."""

    name: str
    image: str = IMAGE
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def create(cls, role: str, image: str = IMAGE) -> Container:
        name = f"orch-image-test-{role}-{uuid.uuid4().hex[:6]}"
        buildah("from", "--pull-never", "--name", name, image)
        return cls(name=name, image=image)

    def _argv(self, argv: Sequence[str], env: dict[str, str]) -> list[str]:
        command = ["buildah", "--root", STORAGE, "--runroot", RUNROOT, "--storage-driver", "vfs"]
        command += ["run", "--isolation", "chroot", "--network", "host", "--user", USER]
        for name, value in sorted(env.items()):
            command += ["--env", f"{name}={value}"]
        return [*command, self.name, "--", *argv]

    def run(
        self, argv: Sequence[str], env: dict[str, str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to its end (a Job's container, an exec probe)."""
        return subprocess.run(
            self._argv(argv, env), capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self, argv: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start a long-running command (a Deployment's container), output into ``log``."""
        with log.open("ab") as out:
            process = subprocess.Popen(self._argv(argv, env), stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def main_pid(self, process: subprocess.Popen[bytes], timeout: float = 10) -> int:
        """The pid of the command itself (a pod's PID 1) under `buildah run`'s own helpers.

        buildah does not forward SIGTERM to the command (it kills it), so a graceful stop
        signals this process directly, as the kubelet signals a container's first process.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            todo, seen = [process.pid], []
            while todo:
                pid = todo.pop()
                for child in _children(pid):
                    try:
                        comm = Path(f"/proc/{child}/comm").read_text().strip()
                    except OSError:
                        continue
                    if comm.startswith(("buildah", "memfd:")):
                        todo.append(child)
                    else:
                        seen.append(child)
            if seen:
                return min(seen)
            time.sleep(0.1)
        raise RuntimeError(f"no command under buildah run (pid {process.pid})")

    def terminate(self, process: subprocess.Popen[bytes], timeout: float = 60) -> int:
        """SIGTERM to the command, then wait for it; its exit status."""
        if process.poll() is None:
            os.kill(self.main_pid(process), signal.SIGTERM)
        return process.wait(timeout=timeout)

    def files_written_outside(self, writable: Sequence[str], uid: int = 10001) -> list[str]:
        """Paths in the root filesystem owned by ``uid`` outside the ``writable`` mounts:
        what a read-only root filesystem would have refused."""
        root = Path(buildah("mount", self.name).strip())
        try:
            found = []
            for directory, dirs, files in os.walk(root):
                rel = "/" + str(Path(directory).relative_to(root)).lstrip(".")
                if any(rel == w or rel.startswith(w.rstrip("/") + "/") for w in writable):
                    dirs[:] = []
                    continue
                for name in dirs + files:
                    path = Path(directory, name)
                    if path.lstat().st_uid == uid:
                        found.append(str(Path(rel, name)))
            return sorted(found)
        finally:
            buildah("unmount", self.name)

    def remove(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.kill(self.main_pid(process, timeout=2), signal.SIGKILL)
                except (RuntimeError, ProcessLookupError):
                    process.kill()
                process.wait(timeout=30)
        buildah("rm", self.name)
