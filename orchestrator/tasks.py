"""Thin Celery tasks: read the message, call the lifecycle, map failures to retries."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeAlias

from celery import Task
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from orchestrator import lifecycle
from orchestrator.backoff import exponential_backoff
from orchestrator.config import Settings
from orchestrator.contract import is_valid_stop_reason
from orchestrator.errors import OrchestratorError
from orchestrator.messaging import (
    ADMIT_TASK,
    PUBLISH_EVENTS_TASK,
    REAP_TASK,
    RECONCILE_TASK,
    START_ADMITTED_TASK,
    START_TASK,
    STOP_TASK,
    Topology,
)
from orchestrator.publishing import PublishError, topology
from orchestrator.worker.app import OrchestratorCelery

logger = logging.getLogger(__name__)
DB_RETRY_MAX = 100
DB_RETRY_CAP_SECONDS = 30.0
AnyTask: TypeAlias = "Task[Any, Any]"


ABANDONED_ATTEMPT_HEADER = "orchestrator_abandoned_attempt"
STOPPED_VENDOR_SESSION_HEADER = "orchestrator_stopped_vendor_session"


class StorageError(OrchestratorError):
    """A database error that is not an outage, told by its class and SQLSTATE only: the
    server's message may quote the statement's data (a request payload)."""


@contextmanager
def retry_when_database_is_away(task: AnyTask) -> Iterator[None]:
    """The database is unreachable (or this process's pool is full): publish this same message
    (same task id) again later. The lifecycle steps are idempotent per task id, so the retry
    carries on where it stopped. A step that asks to run again later (RetryLater) is published
    again the same way. After ``DB_RETRY_MAX`` retries the message is dead-lettered, and
    nothing of its arguments is logged (they may hold the customer's keys)."""
    try:
        yield
    except lifecycle.RetryLater as later:
        headers = {
            ABANDONED_ATTEMPT_HEADER: later.abandoned_attempt or "",
            STOPPED_VENDOR_SESSION_HEADER: later.stopped_vendor_session or "",
        }
        _retry(task, later.delay, str(later), headers)
    except PoolTimeout:
        _retry(task, _backoff(task), "no free database connection in this worker", _carried(task))
    except DBAPIError as error:
        if not error.connection_invalidated and not isinstance(
            error, OperationalError | InterfaceError
        ):
            sqlstate = getattr(error.orig, "sqlstate", None) or "unknown"
            logger.error(
                "%s: database error %s (SQLSTATE %s)", task.name, type(error).__name__, sqlstate
            )
            raise StorageError(f"{type(error).__name__} (SQLSTATE {sqlstate})") from None
        why = f"database unavailable ({type(error.orig).__name__})"
        _retry(task, _backoff(task), why, _carried(task))


def _carried(task: AnyTask) -> dict[str, str]:
    """This delivery's own headers, for a retry that sets none: an abandoned attempt and a
    stopped vendor session must reach the delivery that can act on them, however many outage
    retries come between (a retry's headers replace the message's)."""
    return {
        name: value
        for name in (ABANDONED_ATTEMPT_HEADER, STOPPED_VENDOR_SESSION_HEADER)
        if isinstance(value := getattr(task.request, name, None), str) and value
    }


@contextmanager
def requeue_when_unpublished(name: str) -> Iterator[None]:
    """A publish this task needed (its own retry, admission's dispatch) was refused within the
    publish bound (an alarm, a lost majority): the message goes back to its queue, to be
    delivered again, instead of failing. With ``task_acks_on_failure_or_timeout`` off a failure
    would dead-letter it (Celery rejects a retry it could not publish the same way). Every
    step is idempotent per task id, so running the message again carries on where it stopped.
    On quorum queues each requeue counts towards the delivery limit."""
    try:
        yield
    except PublishError as error:
        _requeue(name, error)
    except Reject as rejected:
        reason = getattr(rejected, "reason", None)
        if isinstance(reason, PublishError):
            _requeue(name, reason)
        raise


def _requeue(name: str, error: PublishError) -> NoReturn:
    logger.warning("%s: %s; message requeued", name, error)
    raise Reject(f"requeued: {error}", requeue=True) from None


def _backoff(task: AnyTask) -> float:
    return exponential_backoff(int(task.request.retries) + 1, base=0.5, cap=DB_RETRY_CAP_SECONDS)


def _retry(
    task: AnyTask, delay: float, why: str, headers: dict[str, str] | None = None
) -> NoReturn:
    if task.request.retries >= DB_RETRY_MAX:
        logger.error(
            "%s[%s]: gave up after %d retries (%s); dead-lettered",
            task.name,
            task.request.id,
            task.request.retries,
            why,
        )
        raise Reject(f"gave up after {task.request.retries} retries: {why}", requeue=False)
    countdown = _topology(task).retry_countdown(delay)
    logger.warning("%s: %s, retry in %.1f s", task.name, why, countdown)
    # Our own limit above acts first; Celery's would log the arguments. On quorum queues the
    # retry waits in the broker (native delayed delivery), not in a worker's memory.
    raise task.retry(
        countdown=countdown, max_retries=DB_RETRY_MAX + 1, headers=headers or {}
    ) from None


def _topology(task: AnyTask) -> Topology:
    settings = getattr(task.app, "settings", None)
    return topology(settings) if isinstance(settings, Settings) else Topology("classic")


def _traceparent(task: AnyTask) -> str | None:
    value = getattr(task.request, "traceparent", None)
    return value if isinstance(value, str) and len(value) <= 128 else None


def _abandoned_attempt(task: AnyTask) -> str | None:
    value = getattr(task.request, ABANDONED_ATTEMPT_HEADER, None)
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def _stopped_vendor_session(task: AnyTask) -> str | None:
    value = getattr(task.request, STOPPED_VENDOR_SESSION_HEADER, None)
    return value if isinstance(value, str) and 0 < len(value) <= 255 else None


def register(app: OrchestratorCelery) -> None:
    """Register every task of the contract (docs/messages.md) on ``app``."""

    @app.task(name=START_TASK, shared=False, bind=True, acks_late=True, reject_on_worker_lost=True)
    def start_session(self: AnyTask, *args: Any, **kwargs: Any) -> dict[str, str]:
        with requeue_when_unpublished(START_TASK), retry_when_database_is_away(self):
            outcome = lifecycle.handle_start_message(
                app.lifecycle(),
                args,
                kwargs,
                claim_id=str(self.request.id),
                traceparent=_traceparent(self),
                abandoned_attempt=_abandoned_attempt(self),
                stopped_vendor_session=_stopped_vendor_session(self),
            )
        return {"request_id": outcome.request_id, "status": outcome.status}

    @app.task(
        name=START_ADMITTED_TASK,
        shared=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def start_admitted(self: AnyTask, session_id: str, claim_id: str) -> dict[str, str]:
        with requeue_when_unpublished(START_ADMITTED_TASK), retry_when_database_is_away(self):
            outcome = lifecycle.run_start(
                app.lifecycle(),
                uuid.UUID(session_id),
                claim_id,
                _abandoned_attempt(self),
                stopped_vendor_session=_stopped_vendor_session(self),
            )
        return {"request_id": outcome.request_id, "status": outcome.status}

    @app.task(name=STOP_TASK, shared=False, bind=True, acks_late=True, reject_on_worker_lost=True)
    def stop_session(
        self: AnyTask,
        request_id: str | None = None,
        session_id: str | None = None,
        reason: str = "USER_CLOSED",
    ) -> dict[str, Any]:
        if (request_id is None) == (session_id is None) or not is_valid_stop_reason(reason):
            logger.error("invalid stop message dead-lettered (needs one id and a reason)")
            raise Reject(
                "give exactly one of request_id or session_id, and a reason", requeue=False
            )
        with requeue_when_unpublished(STOP_TASK), retry_when_database_is_away(self):
            result = lifecycle.request_stop(
                app.lifecycle(), request_id=request_id, session_id=session_id, reason=reason
            )
        return {"found": result.found, "status_before": result.status_before}

    @app.task(name=REAP_TASK, shared=False, acks_late=True)
    def reap_sessions() -> dict[str, int]:
        with requeue_when_unpublished(REAP_TASK):
            report = lifecycle.reap(
                app.lifecycle(), plan_ahead=app.settings.reaper_interval_seconds
            )
        return {"claimed": report.claimed, "stopped": report.stopped}

    @app.task(name=RECONCILE_TASK, shared=False, acks_late=True)
    def reconcile_sessions() -> dict[str, int]:
        settings = app.settings
        with requeue_when_unpublished(RECONCILE_TASK):
            return lifecycle.reconcile(
                app.lifecycle(), min_spacing=settings.reconcile_interval_seconds / 2
            ).as_dict()

    @app.task(name=PUBLISH_EVENTS_TASK, shared=False, acks_late=True)
    def publish_events() -> None:
        app.dispatcher.relay.relay_now()

    @app.task(name=ADMIT_TASK, shared=False, acks_late=True)
    def admit_waiting() -> dict[str, int]:
        with requeue_when_unpublished(ADMIT_TASK):
            report = lifecycle.admit_waiting(app.lifecycle())
        return {"admitted": report.admitted, "expired": report.expired}
