"""What every process that publishes tasks shares: the broker, JSON only, the queues and routes
of the contract, publisher confirms. The producer publishes through :func:`publishing_app`,
which builds none of the worker; :mod:`orchestrator.worker.celery_app` adds the worker's part."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery

from orchestrator.config import Settings
from orchestrator.errors import OrchestratorError
from orchestrator.messaging import CONTROL_QUEUE, TASK_QUEUES, Topology
from orchestrator.retries import PUBLISH_AFTER_NACK

EMBEDDED_TRANSPORT = "orchestrator.embedded_broker:EmbeddedTransport"
DEFAULT_PUBLISH_TIMEOUT_SECONDS = 15.0
logger = logging.getLogger(__name__)
T = TypeVar("T")


class PublishError(OrchestratorError, RuntimeError):
    """The broker did not confirm the message within ``ORCHESTRATOR_PUBLISH_TIMEOUT_SECONDS``
    (unreachable, an alarm, a quorum queue without its majority, no queue bound to route it
    to): nothing was enqueued, for all the caller can tell. Publishing it again is safe."""

    shown_as = "broker (ORCHESTRATOR_BROKER_URL)"


class Unroutable(OrchestratorError):
    """The broker returned a ``mandatory`` message: no queue is bound to take it."""


def retryable_publish_errors() -> tuple[type[BaseException], ...]:
    """What a publish may meet from the broker and survive by being published again: lost or
    blocked connections, confirm timeouts, nacks, channel errors (an exchange being
    redeclared), returned messages. Anything else (a body that does not serialize) is a bug."""
    from amqp.exceptions import AMQPError, MessageNacked
    from kombu.exceptions import LimitExceeded, OperationalError

    return (OSError, AMQPError, MessageNacked, OperationalError, LimitExceeded, Unroutable)


def _returns(channel: Any) -> list[str]:
    """The messages the broker returned on ``channel`` (one list per channel, the handler
    installed once). RabbitMQ sends a mandatory message's return before its confirm, so it is
    in the list when the confirm wait ends; unhandled, py-amqp would raise in the middle of
    that wait and leave the confirm unread for the channel's next publish to take as its own."""
    found: list[str] | None = getattr(channel, "_orchestrator_returns", None)
    if found is None:
        returned: list[str] = []

        def on_return(error: Any, exchange: str, routing_key: str, _message: Any) -> None:
            returned.append(f"{exchange or '(default)'}/{routing_key}: {error}")

        channel.events["basic_return"].add(on_return)
        channel._orchestrator_returns = returned
        found = returned
    return found


def discard_connection(producer: Any) -> None:
    """Drop the producer's connection without the closing handshake (a blocked connection
    never answers it): a confirm that comes late must not be taken for another message's."""
    connection = getattr(producer, "connection", None)
    if connection is None:
        return
    try:
        connection.collect()
        connection.maybe_switch_next()
        producer.revive(connection)  # a producer kept by its owner (beat's) connects afresh
    except Exception:  # already gone: the next publish connects afresh
        logger.debug("could not discard a broker connection", exc_info=True)


def connect_within(producer: Any, seconds: float) -> None:
    """Connect a pooled producer's connection, trying each broker URL once, for at most
    ``seconds``. Left to kombu, the first use of the channel retries the connection for
    ``broker_connection_timeout`` or longer, past the publish's bound while the broker is
    down; :func:`publish_within` does the retrying, with backoff, within the bound. (The
    socket's own connect timeout still applies to an address that does not answer.)"""
    connection = getattr(producer, "__connection__", None)
    if connection is None or connection.connected:
        return
    connection.ensure_connection(
        max_retries=max(len(connection.alt), 1) - 1, interval_start=0, timeout=seconds
    )


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
                    returned = _returns(producer.channel)
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

        return publish_within(self.publish_timeout, attempt, name)


def publish_within(bound: float, attempt: Callable[[float], T], what: str) -> T:
    """``attempt(seconds left)`` until it returns, again with backoff after each error the
    broker may recover from, for ``bound`` seconds in all; then :class:`PublishError`. The
    attempt discards its connection when it fails (see :func:`discard_connection`)."""
    deadline = time.monotonic() + bound
    attempts = 0
    while True:
        try:
            return attempt(max(deadline - time.monotonic(), 0.1))
        except retryable_publish_errors() as error:
            attempts += 1
            why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if time.monotonic() >= deadline:
                raise PublishError(
                    f"could not publish {what} within {bound:g} s ({attempts} attempts;"
                    f" last: {why})"
                ) from None
            delay = PUBLISH_AFTER_NACK.delay(attempts)
            delay = min(delay, max(0.0, deadline - time.monotonic()))
            logger.warning("publish of %s refused (%s); again in %.1f s", what, why, delay)
            time.sleep(delay)


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
    app.conf.update(publishing_config(settings))
    return app
