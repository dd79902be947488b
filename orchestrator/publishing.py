"""What every process that publishes tasks shares: the broker, JSON only, the queues and routes
of the contract, publisher confirms. The producer publishes through :func:`publishing_app`,
which builds none of the worker; :mod:`orchestrator.celery_app` adds the worker's part."""

from __future__ import annotations

from typing import Any

from celery import Celery

from orchestrator.config import Settings
from orchestrator.messaging import CONTROL_QUEUE, TASK_QUEUES, WORK_QUEUES

EMBEDDED_TRANSPORT = "orchestrator.embedded_broker:EmbeddedTransport"


def broker_url(settings: Settings) -> str:
    """The broker URL Celery gets (the embedded broker's prefix is our transport's business)."""
    return settings.effective_broker_url.removeprefix("sqla+")


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
        "task_queues": WORK_QUEUES,
        "task_default_queue": CONTROL_QUEUE,
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
