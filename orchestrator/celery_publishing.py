"""The Celery app every process that publishes tasks shares: the broker, JSON only, the
queues and routes of the contract, each publish confirmed and bounded. The producer publishes
through :func:`publishing_app`, which builds none of the worker;
:mod:`orchestrator.worker.celery_app` adds the worker's part. It is not in ``worker/``: the
producer and the worker may not import each other (docs/architecture.md, "Layers"). What
publishing needs of the broker alone (errors, the loop that publishes again) is in
:mod:`orchestrator.publishing`."""

from __future__ import annotations

from typing import Any

from celery import Celery

from orchestrator import retries
from orchestrator.config import Settings
from orchestrator.messaging import CONTROL_QUEUE, TASK_QUEUES
from orchestrator.publishing import (
    DEFAULT_PUBLISH_TIMEOUT_SECONDS,
    Unroutable,
    broker_url,
    connect_within,
    discard_connection,
    publish_within,
    retryable_publish_errors,
    returned_messages,
    topology,
)

EMBEDDED_TRANSPORT = "orchestrator.embedded_broker:EmbeddedTransport"


class PublishingCelery(Celery):
    """Celery whose every publish (the producer's, a task's retry, admission's dispatch,
    beat's ticks: all go through :meth:`send_task`) is bounded and never falsely confirmed:

    - ``mandatory``: a message no queue takes is returned, not confirmed into nowhere (during
      ``orchestrator queues migrate`` an exchange is briefly without its binding);
    - each attempt waits for the broker's confirm for what is left of
      ``publish_timeout`` (``ORCHESTRATOR_PUBLISH_TIMEOUT_SECONDS``); a refused, returned or
      unanswered attempt drops its connection and is published again with backoff (a leader
      election nacks for a few seconds) until the bound, then :class:`PublishError`.

    A message may thus reach the queue twice (a confirm lost with its connection): consumers
    are idempotent per task id. The embedded broker has no confirms: published as Celery does.
    """

    publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT_SECONDS
    publish_backoff: retries.Backoff = retries.publish_after_nack()

    def send_task(self, *args: Any, **options: Any) -> Any:
        transport = self.conf.broker_transport_options or {}
        if not transport.get("confirm_publish"):
            return super().send_task(*args, **options)
        for setting in ("retry", "retry_policy", "mandatory", "confirm_timeout", "timeout"):
            options.pop(setting, None)
        given = options.pop("producer", None)
        name = str(args[0] if args else options.get("name"))

        def attempt(remaining: float) -> Any:
            with self.producer_or_acquire(given) as producer:
                try:
                    connect_within(producer, remaining)
                    returned = returned_messages(producer.channel)
                    returned.clear()
                    attempt_options = {
                        **options,
                        "producer": producer,
                        "retry": False,
                        "mandatory": True,
                        "confirm_timeout": remaining,
                        "timeout": remaining,
                    }
                    result = super(PublishingCelery, self).send_task(*args, **attempt_options)
                    if returned:
                        raise Unroutable(returned[0])
                    return result
                except retryable_publish_errors():
                    discard_connection(producer)
                    raise

        return publish_within(self.publish_timeout, attempt, name, self.publish_backoff)


def publishing_config(settings: Settings) -> dict[str, Any]:
    transport_options: dict[str, Any] = {}
    if settings.effective_broker_url.startswith(("amqp", "pyamqp")):
        transport_options["confirm_publish"] = True
    embedded = settings.effective_broker_url.startswith("sqla+")
    return {
        "broker_transport": EMBEDDED_TRANSPORT if embedded else None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "task_queues": topology(settings).work_queues,
        "task_default_queue": CONTROL_QUEUE,
        "task_default_queue_type": settings.effective_queue_type,
        # Countdown retries wait in the broker's delay queues (native delayed delivery, quorum
        # only), replicated like the work queues; Celery picks this up from the quorum
        # arguments of task_queues, and turns global QoS off for them.
        "broker_native_delayed_delivery_queue_type": "quorum",
        "task_routes": task_routes(settings),
        "task_create_missing_queues": False,
        "task_publish_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options,
        # Waiting for a free producer of the pool counts against the publish's bound too.
        "broker_pool_acquire_timeout": settings.publish_timeout_seconds,
    }


def task_routes(settings: Settings) -> dict[str, dict[str, str]]:
    """Each task to its queue, through the queue's exchange. For a direct exchange (classic)
    Celery would publish through the default exchange straight to the queue, which unbinding
    cannot stop: ``queues migrate`` could then delete a queue with a message just confirmed
    into it. On RabbitMQ the exchange is named explicitly (the embedded broker keeps
    Celery's default)."""
    through_exchange = settings.effective_broker_url.startswith(("amqp", "pyamqp"))
    return {
        name: {"queue": queue, "exchange": queue, "routing_key": queue}
        if through_exchange
        else {"queue": queue}
        for name, queue in TASK_QUEUES.items()
    }


def publishing_app(settings: Settings) -> Celery:
    """A Celery app that only publishes: no tasks, no consumer, no lifecycle."""
    app = PublishingCelery(
        "orchestrator-producer", broker=broker_url(settings), set_as_current=False
    )
    app.publish_timeout = settings.publish_timeout_seconds
    app.publish_backoff = retries.publish_after_nack(settings)
    app.conf.update(publishing_config(settings))
    return app
