"""Liveness for probes: the worker touches ``worker.heartbeat`` while its consumer is
connected to the broker, beat touches ``beat.heartbeat`` on every tick."""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.beat import PersistentScheduler

from orchestrator import heartbeat
from orchestrator.config import Settings

HEARTBEAT_EVERY_SECONDS = 10.0


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Touches ``worker.heartbeat`` while the consumer is connected to the broker."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        self._timer_entry: Any = None

    def start(self, consumer: Any) -> None:
        state_dir = consumer.app.settings.state_dir

        def beat() -> None:
            if consumer.connection is not None and consumer.connection.connected:
                heartbeat.touch(state_dir, "worker")

        beat()
        self._timer_entry = consumer.timer.call_repeatedly(HEARTBEAT_EVERY_SECONDS, beat)

    def stop(self, consumer: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()


class HeartbeatScheduler(PersistentScheduler):
    """Celery beat's scheduler, touching ``beat.heartbeat`` on every tick."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        settings: Settings = getattr(self.app, "settings")  # noqa: B009 - our Celery subclass
        heartbeat.touch(settings.state_dir, "beat")
        return float(super().tick(*args, **kwargs))
