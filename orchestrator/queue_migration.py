"""``orchestrator queues migrate``: move the broker's queues to the shape the settings ask for
(quorum or classic, the delivery limit) without losing a queued message.

RabbitMQ cannot change a queue's arguments or an exchange's type in place. For each queue
whose declaration the broker refuses (PRECONDITION_FAILED), with no consumer on it:

1. declare a holding queue ``<name>.migrating`` and bind it where the queue is bound (and to
   Celery's ``celery_delayed_delivery`` exchange, where countdown retries come back), then
   unbind the queue: new messages land in the holding queue from now on;
2. move every message of the queue to the holding queue (publisher confirms; each message is
   acknowledged only once the broker confirmed its copy, so a crash duplicates, never loses);
3. delete the queue (only if empty) and, when its exchange's type must change, the exchange,
   declared again at once with the holding queue bound to it again;
4. declare the queue as asked, bound as before (countdown retries included), and only then
   unbind the holding queue;
5. move the holding queue's messages back, then delete it.

No message is confirmed into nowhere: between an exchange's delete and the holding queue's
binding again a publish fails (NOT_FOUND, or returned as unroutable: the publishers of this
service publish ``mandatory``), and the publisher publishes it again within its bound or
raises ``PublishError``. Every step can run again: a command that stopped (or was killed)
half way is finished by running it again (messages waiting in a holding queue are moved
back). Messages keep their headers (``x-death`` included) and properties.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from amqp import Message
from amqp.exceptions import NotFound, PreconditionFailed
from kombu import Connection

from orchestrator.errors import OrchestratorError
from orchestrator.messaging import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    WORK_QUEUE_NAMES,
    Topology,
)

logger = logging.getLogger(__name__)
HOLDING_SUFFIX = ".migrating"
# Celery's native delayed delivery (kombu.transport.native_delayed_delivery): countdown retries
# leave their last delay queue through this exchange, bound to each work queue's exchange.
DELAYED_DELIVERY_EXCHANGE = "celery_delayed_delivery"


class MigrationRefused(OrchestratorError):
    """The migration cannot run now (consumers attached); the message says why."""


@dataclass(frozen=True)
class QueuePlan:
    """One queue, where it is bound, and how it should be declared."""

    name: str
    exchange: str
    exchange_type: str
    routing_key: str
    arguments: dict[str, Any]
    holding_arguments: dict[str, Any]

    @property
    def holding(self) -> str:
        return self.name + HOLDING_SUFFIX


@dataclass(frozen=True)
class QueueReport:
    name: str
    changed: bool
    moved: int

    def line(self, queue_type: str) -> str:
        if not self.changed:
            extra = f" ({self.moved} messages moved back from {self.name}{HOLDING_SUFFIX})"
            return f"{self.name}: already as asked ({queue_type})" + (extra if self.moved else "")
        return f"{self.name}: redeclared as {queue_type}, {self.moved} messages moved"


def plans(topology: Topology) -> list[QueuePlan]:
    holding = {"x-queue-type": "quorum"} if topology.quorum else {}
    found = [
        QueuePlan(
            name,
            name,
            topology.exchange_type,
            name,
            topology.work_queue_arguments(),
            holding,
        )
        for name in WORK_QUEUE_NAMES
    ]
    found.append(
        QueuePlan(
            DEAD_LETTER_QUEUE,
            DEAD_LETTER_EXCHANGE,
            "fanout",
            "",
            topology.dead_letter_queue_arguments(),
            holding,
        )
    )
    return found


def migrate(
    connection: Connection,
    topology: Topology,
    progress: Callable[[str], None] = logger.info,
) -> list[QueueReport]:
    """Bring every queue of the contract to ``topology``; see the module's docstring."""
    return [_migrate_queue(connection, plan, progress) for plan in plans(topology)]


@contextmanager
def _scratch_channel(connection: Connection) -> Iterator[Any]:
    """A channel of its own for one probe: the broker closes a channel whose declaration it
    refuses, so each probe gets a fresh one, closed after (quietly if already closed)."""
    channel: Any = connection.channel()
    try:
        yield channel
    finally:
        try:
            channel.close()
        except Exception:
            logger.debug("channel already closed", exc_info=True)


def _refused(connection: Connection, declare: Callable[[Any], Any]) -> bool:
    """True if the broker refuses ``declare`` (PRECONDITION_FAILED)."""
    with _scratch_channel(connection) as channel:
        try:
            declare(channel)
        except PreconditionFailed:
            return True
    return False


def _exists(connection: Connection, queue: str) -> tuple[int, int] | None:
    """(messages, consumers) of ``queue``, or None if there is no such queue."""
    with _scratch_channel(connection) as channel:
        try:
            _, messages, consumers = channel.queue_declare(queue, passive=True)
        except NotFound:
            return None
        return int(messages), int(consumers)


def _move(connection: Connection, source: str, target: str) -> int:
    """Move every message of ``source`` to ``target`` (through the default exchange); each is
    acknowledged after the broker confirmed its copy."""
    channel: Any = connection.channel()
    channel.confirm_select()
    moved = 0
    try:
        while (message := channel.basic_get(source, no_ack=False)) is not None:
            copy = Message(message.body, **message.properties)
            channel.basic_publish_confirm(copy, exchange="", routing_key=target)
            channel.basic_ack(message.delivery_tag)
            moved += 1
    finally:
        channel.close()
    return moved


def _drain_and_delete(connection: Connection, source: str, target: str) -> int:
    """Move ``source``'s messages to ``target`` until it is empty, then delete it.

    Unbinding stops what comes through the queue's exchange, not a publish through the default
    exchange straight to the queue (what Celery does for a classic queue's direct exchange):
    a classic queue is deleted only if empty, atomically in the broker, else drained again.
    Quorum queues refuse ``if-empty`` deletes; this service publishes to them through their
    topic exchanges only, so emptiness is checked just before."""
    moved = 0
    while True:
        moved += _move(connection, source, target)
        found = _exists(connection, source)
        if found is None:
            return moved
        if found[0] == 0:
            deleted = _delete_if_empty(connection, source)
            if deleted is None:
                channel: Any = connection.channel()
                try:
                    channel.queue_delete(source)
                finally:
                    channel.close()
            if deleted is not False:
                return moved


def _delete_if_empty(connection: Connection, queue: str) -> bool | None:
    """True if ``queue`` was deleted (empty), False if it was not (a message came in), None if
    it cannot be deleted that way (a quorum queue: NOT_IMPLEMENTED, which closes the whole
    connection, hence a connection of its own)."""
    from amqp.exceptions import AMQPNotImplementedError

    with connection.clone() as scratch:
        channel: Any = scratch.channel()
        try:
            channel.queue_delete(queue, if_empty=True)
        except PreconditionFailed:
            return False
        except AMQPNotImplementedError:
            return None
        return True


def _delayed_delivery_exists(connection: Connection) -> bool:
    """Whether Celery's native delayed delivery (a quorum worker declares it) is on the
    broker: its messages come back through this exchange, bound with ``#.<routing key>``."""
    with _scratch_channel(connection) as channel:
        try:
            channel.exchange_declare(DELAYED_DELIVERY_EXCHANGE, "topic", passive=True)
        except NotFound:
            return False
    return True


def _bind(channel: Any, queue: str, plan: QueuePlan, delayed: bool) -> None:
    channel.queue_bind(queue, plan.exchange, plan.routing_key)
    if delayed and plan.routing_key:
        channel.queue_bind(queue, DELAYED_DELIVERY_EXCHANGE, f"#.{plan.routing_key}")


def _unbind(channel: Any, queue: str, plan: QueuePlan, delayed: bool) -> None:
    """Every binding :func:`_bind` makes, and the one Celery's worker adds on a quorum queue's
    own exchange (``#.<routing key>``); unbinding what is not bound is no error."""
    channel.queue_unbind(queue, plan.exchange, plan.routing_key)
    if delayed and plan.routing_key:
        channel.queue_unbind(queue, plan.exchange, f"#.{plan.routing_key}")
        channel.queue_unbind(queue, DELAYED_DELIVERY_EXCHANGE, f"#.{plan.routing_key}")


def _migrate_queue(
    connection: Connection, plan: QueuePlan, progress: Callable[[str], None]
) -> QueueReport:
    def declare_queue(channel: Any) -> None:
        channel.queue_declare(plan.name, durable=True, auto_delete=False, arguments=plan.arguments)

    def declare_exchange(channel: Any) -> None:
        channel.exchange_declare(plan.exchange, plan.exchange_type, durable=True, auto_delete=False)

    queue_refused = _refused(connection, declare_queue)
    exchange_refused = _refused(connection, declare_exchange)
    delayed = _delayed_delivery_exists(connection)
    moved = 0
    channel: Any = connection.channel()
    try:
        if queue_refused or exchange_refused:
            found = _exists(connection, plan.name)
            if found is not None and found[1]:
                raise MigrationRefused(
                    f"{plan.name} has {found[1]} consumer(s): stop every worker first"
                    " (scale the worker Deployments to 0), then run the migration again"
                )
            channel.queue_declare(
                plan.holding, durable=True, auto_delete=False, arguments=plan.holding_arguments
            )
            _bind(channel, plan.holding, plan, delayed)
            progress(f"{plan.name}: new messages go to {plan.holding}")
            if found is not None:
                _unbind(channel, plan.name, plan, delayed)
                moved += _drain_and_delete(connection, plan.name, plan.holding)
                progress(f"{plan.name}: {moved} messages moved to {plan.holding}, queue deleted")
            if exchange_refused:
                channel.exchange_delete(plan.exchange)
                declare_exchange(channel)
                progress(f"{plan.name}: exchange {plan.exchange} is now {plan.exchange_type}")
                channel.queue_bind(plan.holding, plan.exchange, plan.routing_key)
                progress(f"{plan.name}: {plan.holding} bound to it again")
        declare_exchange(channel)
        declare_queue(channel)
        _bind(channel, plan.name, plan, delayed)
        held = _exists(connection, plan.holding)
        if held is not None:
            progress(f"{plan.name}: declared as asked and bound")
            _unbind(channel, plan.holding, plan, delayed)
            back = _drain_and_delete(connection, plan.holding, plan.name)
            if not (queue_refused or exchange_refused):
                moved += back
            progress(f"{plan.name}: {back} messages moved back")
    finally:
        channel.close()
    return QueueReport(plan.name, queue_refused or exchange_refused, moved)
