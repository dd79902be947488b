"""The threads pool of a worker that serves both queues: start tasks on the pool's own
threads, control tasks (stops, sweeps, admission, the event relay's backstop) on threads of
their own, so a stop never waits for a thread while every start thread is inside a slow vendor
call. Celery has one pool per worker; this is that pool with a second executor.

Deliveries: on quorum queues (the default) each queue's consumer has its own prefetch window,
so a control message is delivered while the start consumer's window is full of running
starts. With classic queues on RabbitMQ the window is the channel's, shared: run the control
queue in a worker of its own there (``--queues``), as the chart does.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from celery.concurrency.base import apply_target
from celery.concurrency.thread import TaskPool

from orchestrator.config import DEFAULT_CONTROL_THREADS
from orchestrator.messaging import CONTROL_QUEUE, TASK_QUEUES

CONTROL_TASKS = frozenset(name for name, queue in TASK_QUEUES.items() if queue == CONTROL_QUEUE)
CONTROL_THREADS_SETTING = "orchestrator_control_threads"  # app.conf key
SPLIT_POOL = f"{__name__}:SplitThreadPool"


class _Applied:
    """What Celery's threads pool returns for a task handed to an executor."""

    def __init__(self, future: Future[Any]) -> None:
        self.f = future
        self.get = future.result

    def wait(self, timeout: float | None = None) -> None:
        wait([self.f], timeout)


class SplitThreadPool(TaskPool):
    """``concurrency`` threads for start tasks, ``app.conf.orchestrator_control_threads`` more
    for control tasks (Celery passes a task's name first in ``args``)."""

    executor: ThreadPoolExecutor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conf = self.app.conf if self.app is not None else {}
        threads = int(conf.get(CONTROL_THREADS_SETTING) or DEFAULT_CONTROL_THREADS)
        self.control_threads = threads
        self.control_executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="control"
        )

    def on_stop(self) -> None:
        self.control_executor.shutdown(cancel_futures=True)
        super().on_stop()

    def on_apply(  # type: ignore[override]  # Celery calls it with these arguments
        self,
        target: Any,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Any = None,
        accept_callback: Any = None,
        **_: Any,
    ) -> _Applied:
        control = bool(args) and args is not None and args[0] in CONTROL_TASKS
        executor = self.control_executor if control else self.executor
        return _Applied(
            executor.submit(apply_target, target, args, kwargs, callback, accept_callback)
        )
