"""Broker topology (the names are the contract: docs/messages.md): work queues with a
dead-letter exchange from the first release, the dead-letter queue, and the lifecycle events
exchange."""

from __future__ import annotations

from kombu import Connection, Exchange, Queue

START_QUEUE = "orchestrator.start"
CONTROL_QUEUE = "orchestrator.control"
DEAD_LETTER_EXCHANGE = "orchestrator.dlx"
DEAD_LETTER_QUEUE = "orchestrator.dead"
EVENTS_EXCHANGE = "orchestrator.events"

START_TASK = "orchestrator.start_session"
STOP_TASK = "orchestrator.stop_session"
REAP_TASK = "orchestrator.reap_sessions"
RECONCILE_TASK = "orchestrator.reconcile_sessions"
ADMIT_TASK = "orchestrator.admit_waiting"
# Internal: the vendor start of a request that waited for a slot (published by admission).
START_ADMITTED_TASK = "orchestrator.start_admitted"
# Internal: beat's backstop for the outbox relay (events are normally relayed after commit).
PUBLISH_EVENTS_TASK = "orchestrator.publish_events"

dead_letter_exchange = Exchange(DEAD_LETTER_EXCHANGE, type="fanout", durable=True)
dead_letter_queue = Queue(DEAD_LETTER_QUEUE, exchange=dead_letter_exchange, durable=True)
events_exchange = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)

# Queue arguments cannot change on an existing RabbitMQ queue: these are fixed for good.
WORK_QUEUE_ARGUMENTS = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}


def work_queue(name: str) -> Queue:
    return Queue(
        name,
        Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=WORK_QUEUE_ARGUMENTS,
    )


WORK_QUEUES = (work_queue(START_QUEUE), work_queue(CONTROL_QUEUE))
TASK_QUEUES = {
    START_TASK: START_QUEUE,
    START_ADMITTED_TASK: START_QUEUE,
    STOP_TASK: CONTROL_QUEUE,
    REAP_TASK: CONTROL_QUEUE,
    RECONCILE_TASK: CONTROL_QUEUE,
    ADMIT_TASK: CONTROL_QUEUE,
    PUBLISH_EVENTS_TASK: CONTROL_QUEUE,
}


def declare_topology(connection: Connection) -> None:
    """Declare every exchange and queue; idempotent, so each process may call it at start."""
    channel = connection.default_channel
    for entity in (dead_letter_exchange, dead_letter_queue, events_exchange, *WORK_QUEUES):
        entity.bind(channel).declare()
