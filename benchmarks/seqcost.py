"""``python -m benchmarks.seqcost DATABASE_URL SIMULATOR_URL COUNT``: the start path's own cost,
uncontended: ``handle_start_message`` called COUNT times in a row, in one thread of a fresh
process (no Celery, no broker), against a zero-latency simulator. Prints one JSON line: wall
and CPU milliseconds per start, SQL statements and commits per start.

It is the floor under P1: one worker process cannot start more than 1000 ÷ (CPU ms per start)
sessions per second, whatever its pool, because of the GIL.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

from sqlalchemy import event

from benchmarks.harness import APP_ID, USER_KEY
from orchestrator.config import load_settings
from orchestrator.lifecycle import handle_start_message
from orchestrator.lifecycle.inline import inline_lifecycle


def main(argv: list[str]) -> int:
    database_url, simulator_url, count = argv[0], argv[1], int(argv[2])
    settings = load_settings(
        database_url=database_url,
        deepbrain_base_url=simulator_url,
        deepbrain_app_id=APP_ID,
        deepbrain_user_key=USER_KEY,
        max_concurrent_sessions=100_000,
        log_level="WARNING",
    )
    lc = inline_lifecycle(settings)
    counters = {"statements": 0, "commits": 0}

    def on_execute(*_: Any) -> None:
        counters["statements"] += 1

    def on_commit(*_: Any) -> None:
        counters["commits"] += 1

    event.listen(lc.db.engine, "before_cursor_execute", on_execute)
    event.listen(lc.db.engine, "commit", on_commit)

    def one(tag: str) -> None:
        kwargs = {"request_id": f"{tag}-{uuid.uuid4().hex}", "avatar_id": "bench-avatar"}
        handle_start_message(lc, (), kwargs, claim_id=str(uuid.uuid4()))

    for _ in range(20):  # warm-up: connections, token, caches
        one("seq-warm")
    counters.update(statements=0, commits=0)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(count):
        one("seq")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    lc.close()
    print(
        json.dumps(
            {
                "starts": count,
                "wall_ms_per_start": round(wall * 1000 / count, 2),
                "cpu_ms_per_start": round(cpu * 1000 / count, 2),
                "statements_per_start": round(counters["statements"] / count, 1),
                "commits_per_start": round(counters["commits"] / count, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
