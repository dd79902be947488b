"""Thin Celery tasks: read the message, call the lifecycle, map failures to retries."""

from __future__ import annotations

import logging
import random
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

from celery import Task
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError

from orchestrator import lifecycle
from orchestrator.messaging import (
    ADMIT_TASK,
    PUBLISH_EVENTS_TASK,
    REAP_TASK,
    RECONCILE_TASK,
    START_ADMITTED_TASK,
    START_TASK,
    STOP_TASK,
)

if TYPE_CHECKING:
    from orchestrator.celery_app import OrchestratorCelery

logger = logging.getLogger(__name__)
REASON_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
DB_RETRY_MAX = 100
DB_RETRY_CAP_SECONDS = 30.0
AnyTask: TypeAlias = "Task[Any, Any]"


@contextmanager
def retry_when_database_is_away(task: AnyTask) -> Iterator[None]:
    """The database is unreachable: publish this same message (same task id) again later.

    The lifecycle steps are idempotent per task id, so the retry carries on where it stopped.
    """
    try:
        yield
    except DBAPIError as error:
        if not error.connection_invalidated and not _is_operational(error):
            raise
        retries = task.request.retries
        delay = min(DB_RETRY_CAP_SECONDS, 0.5 * 2**retries) * random.uniform(0.5, 1.0)
        logger.warning(
            "%s: database unavailable (%s), retry in %.1f s",
            task.name,
            type(error.orig).__name__,
            delay,
        )
        raise task.retry(countdown=delay, max_retries=DB_RETRY_MAX) from None


def _is_operational(error: DBAPIError) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(error, OperationalError | InterfaceError)


def _traceparent(task: AnyTask) -> str | None:
    value = getattr(task.request, "traceparent", None)
    return value if isinstance(value, str) and len(value) <= 128 else None


def register(app: OrchestratorCelery) -> None:
    """Register every task of design.md on ``app``."""

    @app.task(name=START_TASK, shared=False, bind=True, acks_late=True, reject_on_worker_lost=True)
    def start_session(self: AnyTask, *args: Any, **kwargs: Any) -> dict[str, str]:
        with retry_when_database_is_away(self):
            outcome = lifecycle.handle_start_message(
                app.lifecycle(),
                args,
                kwargs,
                claim_id=str(self.request.id),
                traceparent=_traceparent(self),
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
        with retry_when_database_is_away(self):
            outcome = lifecycle.run_start(app.lifecycle(), uuid.UUID(session_id), claim_id)
        return {"request_id": outcome.request_id, "status": outcome.status}

    @app.task(name=STOP_TASK, shared=False, bind=True, acks_late=True, reject_on_worker_lost=True)
    def stop_session(
        self: AnyTask,
        request_id: str | None = None,
        session_id: str | None = None,
        reason: str = "USER_CLOSED",
    ) -> dict[str, Any]:
        if (request_id is None) == (session_id is None) or not REASON_PATTERN.match(str(reason)):
            logger.error("invalid stop message dead-lettered (needs one id and a reason)")
            raise Reject(
                "give exactly one of request_id or session_id, and a reason", requeue=False
            )
        with retry_when_database_is_away(self):
            result = lifecycle.request_stop(
                app.lifecycle(), request_id=request_id, session_id=session_id, reason=reason
            )
        return {"found": result.found, "status_before": result.status_before}

    @app.task(name=REAP_TASK, shared=False, acks_late=True)
    def reap_sessions() -> dict[str, int]:
        report = lifecycle.reap(app.lifecycle(), plan_ahead=app.settings.reaper_interval_seconds)
        return {"claimed": report.claimed, "stopped": report.stopped}

    @app.task(name=RECONCILE_TASK, shared=False, acks_late=True)
    def reconcile_sessions() -> dict[str, int]:
        return lifecycle.reconcile(app.lifecycle()).as_dict()

    @app.task(name=PUBLISH_EVENTS_TASK, shared=False, acks_late=True)
    def publish_events() -> None:
        app.dispatcher.relay_now()

    @app.task(name=ADMIT_TASK, shared=False, acks_late=True)
    def admit_waiting() -> dict[str, int]:
        report = lifecycle.admit_waiting(app.lifecycle())
        return {"admitted": report.admitted, "expired": report.expired}
