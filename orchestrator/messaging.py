"""Broker topology (the names are the contract: docs/messages.md): work queues with a
dead-letter exchange from the first release, the dead-letter queue, and the lifecycle events
exchange.

Two shapes of the same names (``ORCHESTRATOR_QUEUE_TYPE``):

- ``quorum`` (the default): replicated quorum queues that survive the loss of a RabbitMQ node,
  a delivery limit after which a message is dead-lettered (at least once) instead of being
  redelivered forever, and topic exchanges, so Celery's native delayed delivery can route
  countdown retries back to their queue (the broker holds them, not the worker's memory).
- ``classic``: the classic queues on direct exchanges of earlier releases (single-node
  brokers, and the embedded transport, which is always classic).

Queue arguments and exchange types cannot change on an existing RabbitMQ entity: moving from
one shape to the other is ``orchestrator queues migrate`` (:mod:`orchestrator.queue_migration`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from kombu import Connection, Exchange, Queue

from orchestrator.errors import OrchestratorError

START_QUEUE = "orchestrator.start"
CONTROL_QUEUE = "orchestrator.control"
DEAD_LETTER_EXCHANGE = "orchestrator.dlx"
DEAD_LETTER_QUEUE = "orchestrator.dead"
EVENTS_EXCHANGE = "orchestrator.events"
WORK_QUEUE_NAMES = (START_QUEUE, CONTROL_QUEUE)

START_TASK = "orchestrator.start_session"
STOP_TASK = "orchestrator.stop_session"
REAP_TASK = "orchestrator.reap_sessions"
RECONCILE_TASK = "orchestrator.reconcile_sessions"
ADMIT_TASK = "orchestrator.admit_waiting"
# Internal: the vendor start of a request that waited for a slot (published by admission).
START_ADMITTED_TASK = "orchestrator.start_admitted"
# Internal: beat's backstop for the outbox relay (events are normally relayed after commit).
PUBLISH_EVENTS_TASK = "orchestrator.publish_events"

QueueType = Literal["quorum", "classic"]
DEFAULT_QUEUE_TYPE: QueueType = "quorum"
DEFAULT_DELIVERY_LIMIT = 10

dead_letter_exchange = Exchange(DEAD_LETTER_EXCHANGE, type="fanout", durable=True)
events_exchange = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)

TASK_QUEUES = {
    START_TASK: START_QUEUE,
    START_ADMITTED_TASK: START_QUEUE,
    STOP_TASK: CONTROL_QUEUE,
    REAP_TASK: CONTROL_QUEUE,
    RECONCILE_TASK: CONTROL_QUEUE,
    ADMIT_TASK: CONTROL_QUEUE,
    PUBLISH_EVENTS_TASK: CONTROL_QUEUE,
}


class TopologyMismatch(OrchestratorError):
    """A queue or exchange exists on the broker with other arguments or another type than the
    settings ask for; the message (one line) says what to do."""

    shown_as = ""


@dataclass(frozen=True)
class Topology:
    """The queues and exchanges of one queue type (and delivery limit)."""

    queue_type: QueueType = DEFAULT_QUEUE_TYPE
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    @property
    def quorum(self) -> bool:
        return self.queue_type == "quorum"

    @property
    def exchange_type(self) -> str:
        # Native delayed delivery binds a queue's exchange to ``celery_delayed_delivery`` with
        # ``#.<routing key>``: a direct exchange cannot route that.
        return "topic" if self.quorum else "direct"

    def work_queue_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
        if self.quorum:
            arguments.update(
                {
                    "x-queue-type": "quorum",
                    "x-delivery-limit": self.delivery_limit,
                    # At-least-once dead-lettering (RabbitMQ 3.10+) needs reject-publish.
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                }
            )
        return arguments

    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.quorum else {}

    def work_exchange(self, name: str) -> Exchange:
        return Exchange(name, type=self.exchange_type, durable=True)

    def work_queue(self, name: str) -> Queue:
        return Queue(
            name,
            self.work_exchange(name),
            routing_key=name,
            durable=True,
            queue_arguments=self.work_queue_arguments(),
        )

    @property
    def work_queues(self) -> tuple[Queue, ...]:
        return tuple(self.work_queue(name) for name in WORK_QUEUE_NAMES)

    @property
    def dead_letter_queue(self) -> Queue:
        return Queue(
            DEAD_LETTER_QUEUE,
            exchange=dead_letter_exchange,
            durable=True,
            queue_arguments=self.dead_letter_queue_arguments(),
        )

    def retry_countdown(self, delay: float) -> float:
        """A retry's countdown: native delayed delivery (quorum) counts whole seconds and
        refuses a positive delay below one, so round up; classic keeps the delay as it is."""
        if not self.quorum or delay <= 0:
            return max(delay, 0.0)
        return float(max(1, math.ceil(delay)))

    def declare(self, connection: Connection) -> None:
        """Declare every exchange and queue; idempotent, so each process may call it at start.
        :class:`TopologyMismatch` if one exists with other arguments (one line)."""
        from amqp.exceptions import PreconditionFailed

        entities: tuple[Exchange | Queue, ...] = (
            dead_letter_exchange,
            self.dead_letter_queue,
            events_exchange,
            *self.work_queues,
        )
        for entity in entities:
            try:
                entity.bind(connection.default_channel).declare()
            except PreconditionFailed as error:
                raise TopologyMismatch(self.mismatch_message(entity, error)) from None

    def mismatch_message(self, entity: Exchange | Queue, error: BaseException) -> str:
        kind = "queue" if isinstance(entity, Queue) else "exchange"
        reason = str(getattr(error, "reply_text", "") or error).splitlines()[0]
        return (
            f"broker: the {kind} {entity.name} exists with other arguments than"
            f" ORCHESTRATOR_QUEUE_TYPE={self.queue_type} and ORCHESTRATOR_DELIVERY_LIMIT="
            f"{self.delivery_limit} ask for ({reason}); stop the workers and run"
            " `orchestrator queues migrate` (docs/operations.md), or set those two variables"
            " to what the broker has (e.g. classic for the queues of earlier releases)"
        )
