"""``python -m benchmarks.start_path``: the files of ``orchestrator/`` one start passes through,
from ``Producer.enqueue_start_session`` to the reaper's stop (docs/architecture.md, "The path
of a start"). Prints the count, then the files.

One process, real parts: a fresh database on the tests' Postgres server, the embedded broker
(kombu's SQLite transport), the simulator. The start message is taken from the queue and run
by the worker app's own task (``Task.apply``, the code a worker runs for a delivery), then the
row is made due and the reaper task runs. A file counts when a function of it runs between the
enqueue and the stop (every thread): start-up (building the app, importing) does not count,
nor does the simulator (the vendor's stand-in).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import text

import orchestrator
from orchestrator.config import load_settings
from orchestrator.db import Database
from orchestrator.db.migrate import upgrade
from orchestrator.messaging import REAP_TASK, START_QUEUE
from orchestrator.producer import Producer
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from tests.conftest import APP_ID, USER_KEY, fresh_postgres_database

ROOT = Path(orchestrator.__file__).parent
SKIP = (ROOT / "simulator",)


class Files:
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def profile(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code.co_name != "<module>":
            self.seen.add(frame.f_code.co_filename)

    def __enter__(self) -> Files:
        threading.setprofile(self.profile)  # type: ignore[arg-type]
        sys.setprofile(self.profile)  # type: ignore[arg-type]
        return self

    def __exit__(self, *_: object) -> None:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]

    def ours(self) -> list[str]:
        names = []
        for name in self.seen:
            path = Path(name)
            if path.is_relative_to(ROOT) and not any(path.is_relative_to(s) for s in SKIP):
                names.append(str(path.relative_to(ROOT.parent)))
        return sorted(names)


def run_one_delivery(app: Any, queue: str) -> None:
    """Take one message off ``queue`` and run its task as a worker would."""
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for _ in range(100):
            message = channel.basic_get(queue, no_ack=True)
            if message is not None:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"no message on {queue}")
        args, kwargs, _embed = message.decode()
        task = app.tasks[message.headers["task"]]
        task.apply(args=args, kwargs=kwargs, task_id=message.headers["id"]).get()


def main() -> int:
    from orchestrator.worker.celery_app import create_app

    with (
        fresh_postgres_database("orch_path") as url,
        SimulatorServer(SimulatorConfig(app_id=APP_ID, user_key=USER_KEY)) as sim,
        tempfile.TemporaryDirectory() as state,
    ):
        upgrade(url)
        settings = load_settings(
            state_dir=Path(state),
            database_url=url,
            broker_url="",
            deepbrain_base_url=sim.base_url,
            deepbrain_app_id=APP_ID,
            deepbrain_user_key=USER_KEY,
            log_level="WARNING",
        )
        app = create_app(settings)
        producer = Producer(settings)
        db = Database(url, pool_size=1)
        try:
            app.lifecycle()  # start-up, not the path
            with Files() as files:
                producer.enqueue_start_session(
                    avatar_id="a", max_duration_seconds=600, request_id="path-1"
                )
                run_one_delivery(app, START_QUEUE)
                with db.transaction() as session:
                    session.execute(
                        text("UPDATE sessions SET expires_at = now() WHERE request_id = 'path-1'")
                    )
                app.tasks[REAP_TASK].apply().get()
                time.sleep(1.0)  # the relay's thread publishes the events
            status = producer.session_info("path-1").status
        finally:
            producer.close()
            db.dispose()
            app.lifecycle().close()
    names = files.ours()
    print(f"{len(names)} files (the row ended {status})")
    for name in names:
        print(" ", name)
    return 0 if status == "ended" else 1


if __name__ == "__main__":
    sys.exit(main())
