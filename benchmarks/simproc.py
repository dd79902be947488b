"""``python -m benchmarks.simproc KNOBS_JSON READY_FILE``: the simulator in its own process.

Like ``orchestrator simulator`` but logging at WARNING (its one line per request would cost
the benchmark CPU) and on a free port, whose URL it writes to READY_FILE once bound.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from orchestrator.simulator import SimulatorConfig, run


def main(argv: list[str]) -> int:
    knobs = json.loads(argv[0])
    ready = Path(argv[1])
    logging.basicConfig(level=logging.WARNING)
    config = SimulatorConfig().with_changes(**knobs)

    def on_ready(url: str) -> None:
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(url)
        tmp.rename(ready)

    run(config, "127.0.0.1", 0, on_ready=on_ready)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
