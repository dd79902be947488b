"""The Python producer API: enqueue a start, request a stop, wait for the credentials.

    from orchestrator.producer import enqueue_start_session, wait_for_session
    request_id = enqueue_start_session(avatar_id="…", max_session_duration=10)
    info = wait_for_session(request_id, timeout=60)   # info.livekit_url, info.livekit_token …

Module-level functions use one :class:`Producer` built from the environment on first use.
``wait_for_session`` reads the database; a producer with access to the broker only waits with
:class:`SessionEvents` (the lifecycle events of ``orchestrator.events``) instead.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any, Self

from kombu import Queue
from kombu.exceptions import OperationalError as KombuOperationalError
from opentelemetry import propagate, trace
from sqlalchemy import select

from orchestrator.celery_publishing import publishing_app
from orchestrator.config import Settings, load_settings
from orchestrator.contract import is_valid_stop_reason, parse_start_request
from orchestrator.db import Database, SessionRow
from orchestrator.errors import OrchestratorError
from orchestrator.messaging import START_TASK, STOP_TASK, TopologyMismatch, events_exchange
from orchestrator.publishing import PublishError, retryable_publish_errors, topology
from orchestrator.session_info import SessionInfo
from orchestrator.store.wait_estimates import latest_wait

__all__ = [  # PublishError is the producer's documented error (defined with the publisher)
    "Producer",
    "PublishError",
    "SessionEvents",
    "SessionInfo",
    "SessionNotFound",
    "default_producer",
    "enqueue_start_session",
    "request_stop",
    "wait_for_session",
]
FINAL_FOR_WAIT = frozenset({"active", "ended", "failed"})
TERMINAL = frozenset({"ended", "failed"})
logger = logging.getLogger(__name__)


class SessionNotFound(OrchestratorError, LookupError):
    """No row for this request_id (yet): the worker has not picked the message up."""


tracer = trace.get_tracer("orchestrator.producer")


def _current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


class Producer:
    """Publishes with publisher confirms (on RabbitMQ) and reads results from the database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = publishing_app(settings)
        self._db: Database | None = None
        self._declared = False
        self._lock = threading.Lock()
        self._publish_errors: tuple[type[BaseException], ...] = (
            *retryable_publish_errors(),
            TopologyMismatch,
        )

    @property
    def db(self) -> Database:
        with self._lock:
            if self._db is None:
                self._db = Database(self.settings.effective_database_url, pool_size=2)
            return self._db

    def _ensure_topology(self) -> None:
        if self._declared:
            return
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(  # within the publish bound, like the publish itself
                max_retries=3,
                interval_start=0,
                interval_step=1,
                interval_max=2,
                timeout=math.ceil(self.settings.publish_timeout_seconds),
            )
            topology(self.settings).declare(connection)
        self._declared = True

    def _send(self, name: str, kwargs: dict[str, Any], task_id: str | None = None) -> None:
        headers = {}
        traceparent = _current_traceparent()
        if traceparent:
            headers["traceparent"] = traceparent
        try:
            self._ensure_topology()
            self.app.send_task(
                name,
                kwargs=kwargs,
                task_id=task_id,
                headers=headers,
                kwargsrepr="{…}",  # keep payloads (and the secrets they may hold) out of monitors
                # Declared once above; declaring again on each new connection would recreate
                # a queue `queues migrate` just deleted, or fail on the exchange it retyped.
                declare=[],
            )  # bounded by ORCHESTRATOR_PUBLISH_TIMEOUT_SECONDS: PublishError after that
        except self._publish_errors as error:
            raise PublishError(f"could not publish {name}: {error}") from None

    def enqueue_start_session(self, **kwargs: Any) -> str:
        """Validate and publish a start job; returns its request_id (generated if not given)."""
        kwargs = dict(kwargs)
        kwargs.setdefault("request_id", uuid.uuid4().hex)
        parse_start_request((), kwargs, max_session_minutes=self.settings.max_session_minutes)
        request_id = str(kwargs["request_id"])
        attributes = {
            "orchestrator.request_id": request_id,
            "orchestrator.avatar_id": str(kwargs.get("avatar_id")),
        }
        with tracer.start_as_current_span("session.enqueue", attributes=attributes):
            self._send(START_TASK, kwargs)
        return request_id

    def request_stop(
        self,
        *,
        request_id: str | None = None,
        session_id: str | None = None,
        reason: str = "USER_CLOSED",
    ) -> None:
        if (request_id is None) == (session_id is None):
            raise ValueError("give exactly one of request_id or session_id")
        if not is_valid_stop_reason(reason):
            raise ValueError(
                f"stop reason {reason!r}: upper-case letters, digits and _ (e.g. USER_CLOSED)"
            )
        kwargs: dict[str, Any] = {"reason": reason}
        kwargs.update({"request_id": request_id} if request_id else {"session_id": session_id})
        with tracer.start_as_current_span("session.stop.request"):
            self._send(STOP_TASK, kwargs)

    def session_info(self, request_id: str) -> SessionInfo:
        with self.db.transaction() as session:
            row = session.scalars(
                select(SessionRow).where(SessionRow.request_id == request_id)
            ).one_or_none()
            if row is None:
                raise SessionNotFound(request_id)
            wait = latest_wait(session, row.id) if row.status == "waiting" else None
            return SessionInfo.from_row(row, wait)

    def wait_for_session(
        self,
        request_id: str,
        timeout: float = 60.0,
        on_waiting: Callable[[SessionInfo], None] | None = None,
    ) -> SessionInfo:
        """Poll until the request is ``active``, ``ended`` or ``failed``; TimeoutError if not.
        While it waits for a slot, ``on_waiting`` gets each new wait estimate (its
        ``position``, ``wait_p50_seconds``, ``wait_p90_seconds``, ``estimated_at``)."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        last: SessionInfo | None = None
        told: datetime | None = None
        while True:
            try:
                last = self.session_info(request_id)
            except SessionNotFound:
                last = None
            if last is not None and last.status in FINAL_FOR_WAIT:
                return last
            if on_waiting is not None and last is not None and last.estimated_at != told:
                told = last.estimated_at
                if told is not None:
                    on_waiting(last)
            if time.monotonic() >= deadline:
                state = last.status if last else "not picked up by a worker yet"
                if last is not None and last.position is not None:
                    state += f" (position {last.position}, p50 {last.wait_p50_seconds} s)"
                raise TimeoutError(f"request {request_id} still {state} after {timeout:g} s")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
        self.app.close()


class SessionEvents:
    """A request's outcome from the broker alone: for producers that may not read the
    database (which holds every session's token). It consumes ``orchestrator.events`` through
    a queue of its own (bound to ``session.#``), keeps the latest event of each request it has
    seen (the last ``keep`` requests) and hands them to :meth:`wait`.

    Start it before publishing, so no event can come before the queue exists; one instance
    serves any number of requests and threads (a web back end starts one at boot)::

        events = SessionEvents(settings).start()
        request_id = producer.enqueue_start_session(avatar_id="…")
        info = events.wait(request_id, timeout=60)   # active (credentials), ended or failed

    The queue outlives a dropped connection by ``QUEUE_EXPIRES_MS`` (the consumer reconnects
    with backoff), so no event is missed across a short broker blip; on quorum settings it is
    a quorum queue, replicated like the work queues, so it also outlives the loss of the node
    it was declared on (events published meanwhile wait in it), and each event is
    acknowledged only once remembered (one in flight when a node dies is delivered again).
    Needs RabbitMQ (the embedded SQLite broker routes nothing between processes). The broker
    user needs to declare and read its own ``orchestrator.events.*`` queue and bind it to the
    exchange; it then sees every session's ``session.active`` event, token included, while it runs.
    """

    QUEUE_EXPIRES_MS = 60_000
    PREFETCH = 100
    RECONNECT_MAX_SECONDS = 10.0

    def __init__(self, settings: Settings, *, keep: int = 10_000) -> None:
        self._app = publishing_app(settings)
        self._keep = keep
        arguments: dict[str, Any] = {"x-expires": self.QUEUE_EXPIRES_MS}
        if settings.effective_queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        self._queue = Queue(
            f"orchestrator.events.{socket.gethostname()}.{uuid.uuid4().hex[:12]}",
            exchange=events_exchange,
            routing_key="session.#",
            durable=True,
            auto_delete=False,
            queue_arguments=arguments,
        )
        self._latest: OrderedDict[str, SessionInfo] = OrderedDict()
        self._changed = threading.Condition()
        self._bound = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-events", daemon=True)
        with self._app.connection_for_read() as unopened:  # the transport's error classes
            self._broker_errors: tuple[type[BaseException], ...] = (
                KombuOperationalError,
                OSError,
                *unopened.connection_errors,
                *unopened.channel_errors,
            )

    @property
    def queue_name(self) -> str:
        return str(self._queue.name)

    def start(self, timeout: float = 10.0) -> Self:
        """Bind the queue and start consuming; :class:`PublishError` if the broker cannot be
        reached within ``timeout``."""
        self._thread.start()
        if not self._bound.wait(timeout):
            self.close()
            raise PublishError(f"could not bind to {events_exchange.name} within {timeout:g} s")
        return self

    def wait(self, request_id: str, timeout: float = 60.0) -> SessionInfo:
        """The request's latest event once it is ``active``, ``ended`` or ``failed``;
        TimeoutError if none came within ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: request_id in self._latest, timeout):
                raise TimeoutError(
                    f"no event for request {request_id} after {timeout:g} s"
                    f" on {events_exchange.name}"
                )
            return self._latest[request_id]

    def close(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._app.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _remember_and_ack(self, body: Any, message: Any) -> None:
        self._remember(body)
        message.ack()

    def _remember(self, body: Any) -> None:
        if not isinstance(body, dict) or body.get("status") not in FINAL_FOR_WAIT:
            return
        try:
            info = SessionInfo.from_event(body)
        except (KeyError, ValueError, TypeError):
            logger.warning("ignored a malformed lifecycle event (message id unknown)")
            return
        with self._changed:
            known = self._latest.get(info.request_id)
            if known is not None and known.status in TERMINAL and info.status == "active":
                return  # a late redelivery of `active` after the end: the end stands
            self._latest[info.request_id] = info
            self._latest.move_to_end(info.request_id)
            while len(self._latest) > self._keep:
                self._latest.popitem(last=False)
            self._changed.notify_all()

    def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                with self._app.connection_for_read() as connection:
                    connection.ensure_connection(max_retries=1)
                    with connection.Consumer(
                        self._queue,
                        callbacks=[self._remember_and_ack],
                        accept=["json"],
                        prefetch_count=self.PREFETCH,
                    ):
                        self._bound.set()
                        delay = 0.5
                        while not self._stopping.is_set():
                            try:
                                connection.drain_events(timeout=1)
                            except TimeoutError:
                                connection.heartbeat_check()
            except self._broker_errors as error:
                if self._stopping.is_set():
                    return
                logger.warning("session events: broker connection lost (%s); reconnecting", error)
                self._stopping.wait(delay)
                delay = min(delay * 2, self.RECONNECT_MAX_SECONDS)


_default: Producer | None = None
_default_lock = threading.Lock()


def default_producer() -> Producer:
    global _default  # noqa: PLW0603 - one producer per process, built on first use
    with _default_lock:
        if _default is None:
            _default = Producer(load_settings())
        return _default


def enqueue_start_session(**kwargs: Any) -> str:
    return default_producer().enqueue_start_session(**kwargs)


def request_stop(
    *, request_id: str | None = None, session_id: str | None = None, reason: str = "USER_CLOSED"
) -> None:
    default_producer().request_stop(request_id=request_id, session_id=session_id, reason=reason)


def wait_for_session(
    request_id: str,
    timeout: float = 60.0,
    on_waiting: Callable[[SessionInfo], None] | None = None,
) -> SessionInfo:
    return default_producer().wait_for_session(request_id, timeout, on_waiting)
