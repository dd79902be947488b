"""The Celery application of the worker and of beat, put together: JSON only, late acks,
dead-lettering instead of silent drops, beat's schedule. The parts live in
:mod:`orchestrator.worker`; what publishing alone needs, in
:mod:`orchestrator.celery_publishing`;
``celery -A orchestrator`` loads :mod:`orchestrator.celery`."""

from __future__ import annotations

from typing import Any

from celery import signals

from orchestrator.celery_publishing import publishing_config
from orchestrator.config import Settings
from orchestrator.messaging import (
    ADMIT_TASK,
    CONTROL_QUEUE,
    PUBLISH_EVENTS_TASK,
    REAP_TASK,
    RECONCILE_TASK,
)
from orchestrator.worker.app import OrchestratorCelery
from orchestrator.worker.consumer import DeadLetteringConsumer
from orchestrator.worker.steps import HeartbeatScheduler, WorkerHeartbeat
from orchestrator.worker.tasks import ESTIMATE_WAITS_HEADER, register

__all__ = ["OrchestratorCelery", "celery_config", "create_app"]


def celery_config(settings: Settings) -> dict[str, Any]:
    # No ``expires`` on beat's messages: Celery would compare it with each worker's clock, and
    # a worker a few seconds ahead would drop every sweep. A backlog of sweeps (workers away)
    # costs little: each is idempotent, and the reconciler skips a pass that follows another
    # by less than half its interval (by the database's clock).
    beat_options = {"queue": CONTROL_QUEUE}
    return {
        **publishing_config(settings),
        "task_acks_late": True,
        # A task that fails (a bug, an unstorable payload, retries exhausted) is rejected into
        # orchestrator.dead rather than acked and lost.
        "task_acks_on_failure": False,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Celery 5.7 restores a reduced prefetch count from the pool thread after a broker
        # reconnect; with the threads pool that races the consumer and stalls it for good.
        "worker_enable_prefetch_count_reduction": False,
        "worker_consumer": f"{DeadLetteringConsumer.__module__}:DeadLetteringConsumer",
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "beat_scheduler": f"{HeartbeatScheduler.__module__}:HeartbeatScheduler",
        "beat_schedule_filename": str(settings.state_dir / "beat-schedule"),
        "beat_max_loop_interval": min(settings.reaper_interval_seconds, 5.0),
        "beat_schedule": {
            "reap-expired-sessions": {
                "task": REAP_TASK,
                "schedule": settings.reaper_interval_seconds,
                "options": beat_options,
            },
            "relay-events-backstop": {
                "task": PUBLISH_EVENTS_TASK,
                "schedule": settings.reaper_interval_seconds,
                "options": beat_options,
            },
            "admit-waiting-backstop": {
                "task": ADMIT_TASK,
                "schedule": settings.reaper_interval_seconds,
                "options": beat_options,
            },
            # An admission pass that then estimates every waiting request's wait; sent as the
            # admission task with a header, so a worker of the previous release (a rolling
            # upgrade) runs a plain admission pass instead of dead-lettering an unknown task.
            "estimate-waits": {
                "task": ADMIT_TASK,
                "schedule": settings.wait_estimate_interval_seconds,
                "options": {**beat_options, "headers": {ESTIMATE_WAITS_HEADER: "1"}},
            },
            "reconcile-with-vendor": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_interval_seconds,
                "options": beat_options,
            },
        },
    }


def create_app(settings: Settings) -> OrchestratorCelery:
    """The worker's (and beat's) application, every task of the contract registered."""
    app = OrchestratorCelery(settings)
    app.conf.update(celery_config(settings))
    app.steps["consumer"].add(WorkerHeartbeat)
    register(app)

    @signals.worker_process_init.connect(weak=False)
    def _after_fork(**_: Any) -> None:
        app.forget_lifecycle()

    return app
