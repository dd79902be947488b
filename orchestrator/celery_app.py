"""The Celery application: JSON only, late acks, dead-lettering instead of silent drops."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery, bootsteps, signals
from celery.beat import PersistentScheduler
from celery.worker.consumer import Consumer

from orchestrator import heartbeat, outbox
from orchestrator.config import Settings
from orchestrator.lifecycle import Lifecycle, metrics, tracing
from orchestrator.messaging import (
    ADMIT_TASK,
    CONTROL_QUEUE,
    PUBLISH_EVENTS_TASK,
    REAP_TASK,
    RECONCILE_TASK,
    START_ADMITTED_TASK,
    TASK_QUEUES,
    WORK_QUEUES,
    events_exchange,
)

logger = logging.getLogger(__name__)
HEARTBEAT_EVERY_SECONDS = 10.0


def _malformed_body(message: Any) -> str | None:
    """Why a JSON task body is not Celery's ``[args, kwargs, embed]``, or None if it is.

    Celery itself acks a task whose kwargs are not a mapping as if it had succeeded.
    Bodies that do not decode are left to Celery, which calls ``on_decode_error``.
    """
    try:
        body = message.decode()
    except Exception:  # noqa: BLE001 - the handler's own decode path reports these
        return None
    if not isinstance(body, list | tuple) or len(body) != 3:
        return "the body is not a 3-element list [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return "args (the body's first element) is not a list"
    if not isinstance(kwargs, dict):
        return "kwargs (the body's second element) is not an object"
    if embed is not None and not isinstance(embed, dict):
        return "embed (the body's third element) is not an object"
    return None


class DeadLetteringConsumer(Consumer):
    """Rejects (into ``orchestrator.dead``) what Celery would ack and drop, and never logs
    message bodies: they may carry the customer's LLM keys."""

    @property
    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        errors: tuple[type[BaseException], ...] = getattr(self, "connection_errors", ())
        return errors

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler raises on a body that is not its 3-element list or a message with
        no ``id`` header, and that takes the whole worker down (then the next one: a crash
        loop). Such a message is dead-lettered instead."""
        handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            problem = _malformed_body(message)
            if problem is not None:
                logger.error("malformed task message dead-lettered: %s", problem)
                message.reject_log_error(logger, self._connection_errors, requeue=False)
                return None
            try:
                return handler(message)
            except Exception as exc:  # noqa: BLE001 - any malformed message, one outcome
                logger.error(
                    "malformed task message dead-lettered (task %r): %s",
                    (message.headers or {}).get("task"),
                    type(exc).__name__,
                )
                try:
                    message.reject_log_error(logger, self._connection_errors, requeue=False)
                except Exception:  # already acknowledged or rejected: nothing more to do
                    logger.warning("could not reject the malformed message", exc_info=True)
                return None

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        logger.error(
            "undecodable message dead-lettered (content type %r): %s",
            message.content_type,
            type(exc).__name__,
        )
        message.reject_log_error(logger, self._connection_errors, requeue=False)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        logger.error("message for unknown task %r dead-lettered", message.headers.get("task"))
        message.reject_log_error(logger, self._connection_errors, requeue=False)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        logger.error("invalid task message dead-lettered: %s", exc)
        message.reject_log_error(logger, self._connection_errors, requeue=False)
        signals.task_rejected.send(sender=self, message=message, exc=exc)


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


class OrchestratorCelery(Celery):
    """Celery with the settings attached and one lazily built :class:`Lifecycle` per process."""

    def __init__(self, settings: Settings) -> None:
        broker = settings.effective_broker_url
        if broker.startswith("sqla+"):  # the embedded broker, with a faster poll
            broker = broker.removeprefix("sqla+")
        super().__init__("orchestrator", broker=broker, set_as_current=False)
        self.settings = settings
        self._lifecycle: Lifecycle | None = None
        self._lifecycle_lock = threading.Lock()
        self.dispatcher = CeleryDispatcher(self)

    def lifecycle(self) -> Lifecycle:
        with self._lifecycle_lock:
            if self._lifecycle is None:
                self._lifecycle = Lifecycle.from_settings(self.settings, dispatcher=self.dispatcher)
                metrics.register_gauges(self._lifecycle.db)
            return self._lifecycle

    def forget_lifecycle(self) -> None:
        """After a fork: the parent's connections must not be shared with the child."""
        with self._lifecycle_lock:
            self._lifecycle = None


class CeleryDispatcher:
    """Hands admission work to the queues: admission on control, admitted starts on start."""

    def __init__(self, app: OrchestratorCelery) -> None:
        self.app = app
        self._relay_wanted = threading.Event()
        self._relay_thread: threading.Thread | None = None
        self._relay_lock = threading.Lock()

    def admit_waiting(self) -> None:
        self.app.send_task(ADMIT_TASK)

    def start_admitted(self, session_id: uuid.UUID, claim_id: str) -> None:
        self.app.send_task(
            START_ADMITTED_TASK, kwargs={"session_id": str(session_id), "claim_id": claim_id}
        )

    def publish_events(self) -> None:
        """Wake this process's relay thread: events leave the task's thread and go in batches."""
        self._relay_wanted.set()
        with self._relay_lock:
            if self._relay_thread is None or not self._relay_thread.is_alive():
                self._relay_thread = threading.Thread(
                    target=self._relay_forever, name="event-relay", daemon=True
                )
                self._relay_thread.start()

    def relay_now(self) -> None:
        """One relay pass in this thread (beat's backstop); failures leave the rows for later."""
        try:
            outbox.relay(self.app.lifecycle().db, self._publish_batch)
        except Exception:
            logger.warning("event relay failed; events stay in the outbox", exc_info=True)

    def _relay_forever(self) -> None:
        while True:
            self._relay_wanted.wait()
            self._relay_wanted.clear()
            self.relay_now()

    def _publish_batch(self, batch: Sequence[outbox.PendingEvent]) -> None:
        """Publish persistently; with publisher confirms each publish returns once confirmed."""
        with self.app.producer_pool.acquire(block=True, timeout=10) as producer:
            for event in batch:
                with tracing.session_span(
                    "session.event.publish",
                    event.traceparent,
                    request_id=event.body.get("request_id"),
                    event=event.routing_key,
                    event_id=str(event.event_id),
                ):
                    headers = {"traceparent": event.traceparent} if event.traceparent else {}
                    producer.publish(
                        event.body,
                        exchange=events_exchange,
                        routing_key=event.routing_key,
                        serializer="json",
                        delivery_mode=2,
                        message_id=str(event.event_id),
                        headers=headers,
                        declare=[events_exchange],
                        retry=True,
                        retry_policy={
                            "max_retries": 2,
                            "interval_start": 0.2,
                            "interval_step": 0.5,
                        },
                    )


def celery_config(settings: Settings) -> dict[str, Any]:
    transport_options: dict[str, Any] = {}
    if settings.effective_broker_url.startswith(("amqp", "pyamqp")):
        transport_options["confirm_publish"] = True
    # No ``expires`` on beat's messages: Celery would compare it with each worker's clock, and
    # a worker a few seconds ahead would drop every sweep. A backlog of sweeps (workers away)
    # costs little: each is idempotent, and the reconciler skips a pass that follows another
    # by less than half its interval (by the database's clock).
    beat_options = {"queue": CONTROL_QUEUE}
    embedded = settings.effective_broker_url.startswith("sqla+")
    return {
        "broker_transport": "orchestrator.embedded_broker:EmbeddedTransport" if embedded else None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        # A task that fails (a bug, an unstorable payload, retries exhausted) is rejected into
        # orchestrator.dead rather than acked and lost.
        "task_acks_on_failure": False,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Celery 5.7 restores a reduced prefetch count from the pool thread after a broker
        # reconnect; with the threads pool that races the consumer and stalls it for good.
        "worker_enable_prefetch_count_reduction": False,
        "task_queues": WORK_QUEUES,
        "task_default_queue": CONTROL_QUEUE,
        "task_routes": {name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        "task_create_missing_queues": False,
        "task_publish_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options,
        "worker_consumer": f"{__name__}:DeadLetteringConsumer",
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "beat_scheduler": f"{__name__}:HeartbeatScheduler",
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
            "reconcile-with-vendor": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_interval_seconds,
                "options": beat_options,
            },
        },
    }


def create_app(settings: Settings) -> OrchestratorCelery:
    from orchestrator import tasks

    app = OrchestratorCelery(settings)
    app.conf.update(celery_config(settings))
    app.steps["consumer"].add(WorkerHeartbeat)
    tasks.register(app)

    @signals.worker_process_init.connect(weak=False)
    def _after_fork(**_: Any) -> None:
        app.forget_lifecycle()

    return app
