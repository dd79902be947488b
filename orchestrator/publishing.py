"""What every process that publishes tasks shares: the broker, JSON only, the queues and routes
of the contract, publisher confirms. The producer publishes through :func:`publishing_app`,
which builds none of the worker; :mod:`orchestrator.celery_app` adds the worker's part."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from orchestrator.backoff import exponential_backoff
from orchestrator.config import Settings
from orchestrator.messaging import CONTROL_QUEUE, TASK_QUEUES, Topology

EMBEDDED_TRANSPORT = "orchestrator.embedded_broker:EmbeddedTransport"
# A quorum queue whose leader's node died refuses (nacks) publishes until the other nodes
# have elected a new leader, a few seconds; longer than this is an outage (PublishError).
NACK_RETRY_SECONDS = 15.0
logger = logging.getLogger(__name__)


def _nacked(error: BaseException) -> bool:
    from amqp.exceptions import MessageNacked

    return isinstance(error, MessageNacked) or isinstance(error.__cause__, MessageNacked)


class PublishingCelery(Celery):
    """Celery whose every publish (the producer's, a task's retry, admission's dispatch,
    beat's ticks: all go through :meth:`send_task`) is published again while the broker
    refuses it with a nack, for up to ``NACK_RETRY_SECONDS``. Without it, a retry refused
    during a leader election would be rejected into the dead-letter queue by Celery."""

    def send_task(self, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + NACK_RETRY_SECONDS
        attempt = 0
        while True:
            try:
                return super().send_task(*args, **kwargs)
            except Exception as error:
                if not _nacked(error) or time.monotonic() >= deadline:
                    raise
                attempt += 1
                delay = exponential_backoff(attempt, base=0.25, cap=2.0)
                logger.warning("the broker refused a publish (nack); again in %.1f s", delay)
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))


def broker_url(settings: Settings) -> str:
    """The broker URL Celery gets (the embedded broker's prefix is our transport's business);
    a failover list (``amqp://a//;amqp://b//``) without the spaces kombu would keep."""
    url = settings.effective_broker_url.removeprefix("sqla+")
    return ";".join(part.strip() for part in url.split(";") if part.strip())


def topology(settings: Settings) -> Topology:
    """The queues and exchanges the settings ask for (classic on the embedded broker)."""
    return Topology(settings.effective_queue_type, settings.delivery_limit)


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
        "task_routes": {name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        "task_create_missing_queues": False,
        "task_publish_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options,
    }


def publishing_app(settings: Settings) -> Celery:
    """A Celery app that only publishes: no tasks, no consumer, no lifecycle."""
    app = PublishingCelery(
        "orchestrator-producer", broker=broker_url(settings), set_as_current=False
    )
    app.conf.update(publishing_config(settings))
    return app
