"""Running actions in threads so that what a thread raises fails the test.

An exception in a plain ``threading.Thread`` only reaches pytest through
``threading.excepthook`` (a warning, made an error by pyproject's ``filterwarnings``); these
helpers go further and re-raise it in the test itself, with the thread's traceback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: Longest a racing action may take: a hung thread fails the test instead of hanging it.
RACE_TIMEOUT_SECONDS = 60.0


def race(*actions: Callable[[], Any], timeout: float = RACE_TIMEOUT_SECONDS) -> list[Any]:
    """Run every action in its own thread, all released at the same moment; return their
    results in order. What an action raises is raised here (the first one, by position)."""
    barrier = threading.Barrier(len(actions), timeout=timeout)

    def run(action: Callable[[], Any]) -> Any:
        barrier.wait()
        return action()

    with ThreadPoolExecutor(len(actions), thread_name_prefix="race") as pool:
        futures = [pool.submit(run, action) for action in actions]
        return [future.result(timeout=timeout) for future in futures]


def in_background(action: Callable[[], Any]) -> Future[Any]:
    """Run ``action`` in a thread of its own; ``.result()`` returns or raises what it did."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(action())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name="background", daemon=True).start()
    return future
