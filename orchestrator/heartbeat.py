"""Heartbeat files for liveness probes: cheap to check, touched only while the process works."""

from __future__ import annotations

import time
from pathlib import Path


def heartbeat_path(state_dir: Path, role: str) -> Path:
    return state_dir / f"{role}.heartbeat"


def touch(state_dir: Path, role: str) -> None:
    path = heartbeat_path(state_dir, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def age_seconds(state_dir: Path, role: str) -> float | None:
    """Seconds since the last beat, or None if there never was one."""
    try:
        return time.time() - heartbeat_path(state_dir, role).stat().st_mtime
    except FileNotFoundError:
        return None
