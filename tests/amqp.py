"""The raw Celery protocol v2 message, published the way a non-Python producer does
(docs/messages.md), with every part overridable to make it wrong."""

from __future__ import annotations

import json
import uuid
from typing import Any

from kombu import Connection, Exchange

# Publishing names the exchange only (no declaration), so this works whatever its type: topic
# with quorum queues (the default), direct with classic ones.
START_QUEUE_EXCHANGE = Exchange("orchestrator.start", type="topic", durable=True)


def celery_headers(task: str, task_id: str) -> dict[str, Any]:
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
    }


def raw_body(kwargs: Any, args: Any = None, embed: Any = None) -> bytes:
    embed = embed if embed is not None else {"callbacks": None, "errbacks": None, "chain": None}
    return json.dumps([args if args is not None else [], kwargs, embed]).encode()


def publish_raw(
    broker_url: str,
    kwargs: Any = None,
    *,
    task: str = "orchestrator.start_session",
    body: bytes | None = None,
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
    headers: dict[str, Any] | None = None,
    drop_headers: tuple[str, ...] = (),
    task_id: str | None = None,
) -> str:
    """The Celery protocol v2 message as a non-Python producer publishes it (docs/messages.md),
    with every part overridable to make it wrong. Returns the task id."""
    task_id = task_id or str(uuid.uuid4())
    all_headers = celery_headers(task, task_id)
    all_headers.update(headers or {})
    for name in drop_headers:
        all_headers.pop(name, None)
    if body is None:
        body = raw_body(kwargs)
    with Connection(broker_url) as conn:
        conn.Producer().publish(
            body,
            exchange=START_QUEUE_EXCHANGE,
            routing_key="orchestrator.start",
            headers=all_headers,
            content_type=content_type,
            content_encoding=content_encoding,
            delivery_mode=2,
            correlation_id=task_id,
        )
    return task_id


def purge_work_queues(broker_url: str) -> None:
    """Empty the start, control and dead-letter queues (those not declared yet are skipped)."""
    with Connection(broker_url) as conn:
        channel = conn.channel()
        for queue in ("orchestrator.start", "orchestrator.control", "orchestrator.dead"):
            try:
                channel.queue_purge(queue)
            except Exception:
                channel = conn.channel()
