"""Publishing at the broker's level, each publish bounded: what a refused publish is
(:class:`PublishError`), which errors a publish survives by being published again, a
connection dropped without its handshake, the loop that publishes again
(:func:`publish_within`); and the broker's URL and queues from the settings. kombu only:
the event publisher (``events/``) publishes through it; the Celery app that publishes tasks,
for the producer and the worker alike, builds on it (:mod:`orchestrator.celery_publishing`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from orchestrator import retries
from orchestrator.config import Settings
from orchestrator.errors import OrchestratorError
from orchestrator.messaging import Topology

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


def returned_messages(channel: Any) -> list[str]:
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


def publish_within(
    bound: float,
    attempt: Callable[[float], T],
    what: str,
    backoff: retries.Backoff | None = None,
) -> T:
    """``attempt(seconds left)`` until it returns, again after each error the broker may
    recover from, for ``bound`` seconds in all; then :class:`PublishError`. The loop is the
    policy "publish after a nack" (:func:`orchestrator.retries.publish_within`), its backoff
    ``ORCHESTRATOR_PUBLISH_BACKOFF_*`` (the defaults when not given). The attempt discards
    its connection when it fails (see :func:`discard_connection`)."""
    return retries.publish_within(
        bound,
        attempt,
        what,
        backoff=retries.publish_after_nack() if backoff is None else backoff,
        retryable=retryable_publish_errors(),
        refused=PublishError,
    )


def broker_url(settings: Settings) -> str:
    """The broker URL Celery gets (the embedded broker's prefix is our transport's business);
    a failover list (``amqp://a//;amqp://b//``) without the spaces kombu would keep."""
    url = settings.effective_broker_url.removeprefix("sqla+")
    return ";".join(part.strip() for part in url.split(";") if part.strip())


def topology(settings: Settings) -> Topology:
    """The queues and exchanges the settings ask for (classic on the embedded broker)."""
    return Topology(settings.effective_queue_type, settings.delivery_limit)
