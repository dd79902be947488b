"""What every process that publishes tasks shares: the broker, JSON only, the queues and routes
of the contract, publisher confirms. The producer publishes through :func:`publishing_app`,
which builds none of the worker; :mod:`orchestrator.celery_app` adds the worker's part."""

from __future__ import annotations

from typing import Any

from celery import Celery

from orchestrator.config import Settings
from orchestrator.messaging import CONTROL_QUEUE, TASK_QUEUES, Topology

EMBEDDED_TRANSPORT = "orchestrator.embedded_broker:EmbeddedTransport"


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
    app = Celery("orchestrator-producer", broker=broker_url(settings), set_as_current=False)
    app.conf.update(publishing_config(settings))
    return app
