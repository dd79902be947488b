"""``orchestrator demo`` is the README's first command and the only run of the lifecycle on the
embedded PostgreSQL and the embedded broker, with a worker process sharing the demo's server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_whole_lifecycle_on_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "waiting: all 3 slots busy" in out  # the cap of 3 made two of five wait
    assert out.count("MAX_DURATION_REACHED  1") == 4  # the vendor saw one stop each
    assert "demo-stopped-by-user  ended   avatar-stop" in out
    assert "USER_CLOSED" in out
    assert "session.active  5       5" in out  # every event published
    assert "session.ended   5       5" in out
    assert "session.start" in out  # the trace is shown
    assert "chars, a real LiveKit JWT" in out  # credentials shown, token cut short
    assert "embedded PostgreSQL started and migrated" in out
    state_dir = Path(out.split("worker log): ", 1)[1].split("\n", 1)[0])
    assert not (state_dir / "postgres").exists()  # stopped, then its data removed
    shutil.rmtree(state_dir)
