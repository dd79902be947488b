"""The Python producer API: enqueue a start, request a stop, wait for the credentials.

    from orchestrator.producer import enqueue_start_session, wait_for_session
    request_id = enqueue_start_session(avatar_id="…", max_session_duration=10)
    info = wait_for_session(request_id, timeout=60)   # info.livekit_url, info.livekit_token …

Module-level functions use one :class:`Producer` built from the environment on first use.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from opentelemetry import propagate, trace
from sqlalchemy import select

from orchestrator.config import Settings, load_settings
from orchestrator.db import Database, SessionRow
from orchestrator.lifecycle.requests import is_valid_stop_reason, parse_start_request
from orchestrator.messaging import START_TASK, STOP_TASK, declare_topology
from orchestrator.publishing import publishing_app

FINAL_FOR_WAIT = frozenset({"active", "ended", "failed"})
PUBLISH_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 2,
}


class PublishError(RuntimeError):
    """The broker did not accept the message (after bounded retries): nothing was enqueued."""


class SessionNotFound(LookupError):
    """No row for this request_id (yet): the worker has not picked the message up."""


@dataclass(frozen=True)
class SessionInfo:
    request_id: str
    status: str
    session_id: str | None = None
    livekit_url: str | None = None
    livekit_room: str | None = None
    livekit_token: str | None = None
    livekit_token_expires_at: datetime | None = None
    expires_at: datetime | None = None
    end_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None

    def __repr__(self) -> str:  # the LiveKit token stays out of logs and tracebacks
        token = "set" if self.livekit_token else "none"
        return (
            f"SessionInfo(request_id={self.request_id!r}, status={self.status!r},"
            f" session_id={self.session_id!r}, room={self.livekit_room!r}, token={token},"
            f" expires_at={self.expires_at}, end_reason={self.end_reason!r},"
            f" error_code={self.error_code!r})"
        )

    @classmethod
    def from_row(cls, row: SessionRow) -> SessionInfo:
        return cls(
            request_id=row.request_id,
            status=row.status,
            session_id=row.vendor_session_id,
            livekit_url=row.livekit_url,
            livekit_room=row.livekit_room,
            livekit_token=row.livekit_token,
            livekit_token_expires_at=row.livekit_token_expires_at,
            expires_at=row.expires_at,
            end_reason=row.end_reason,
            error_code=row.error_code,
            error_message=row.error_message,
        )


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
            connection.ensure_connection(max_retries=3)
            declare_topology(connection)
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
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
            )
        except (KombuOperationalError, OSError) as error:
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
            return SessionInfo.from_row(row)

    def wait_for_session(self, request_id: str, timeout: float = 60.0) -> SessionInfo:
        """Poll until the request is ``active``, ``ended`` or ``failed``; TimeoutError if not."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        last: SessionInfo | None = None
        while True:
            try:
                last = self.session_info(request_id)
            except SessionNotFound:
                last = None
            if last is not None and last.status in FINAL_FOR_WAIT:
                return last
            if time.monotonic() >= deadline:
                state = last.status if last else "not picked up by a worker yet"
                raise TimeoutError(f"request {request_id} still {state} after {timeout:g} s")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
        self.app.close()


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


def wait_for_session(request_id: str, timeout: float = 60.0) -> SessionInfo:
    return default_producer().wait_for_session(request_id, timeout)
