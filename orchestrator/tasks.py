"""Thin Celery tasks: read the message, call the lifecycle, map failures to retries."""

from __future__ import annotations

import logging
import random
import re
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError, OperationalError

from orchestrator import lifecycle
from orchestrator.messaging import (
    ADMIT_TASK,
    REAP_TASK,
    RECONCILE_TASK,
    START_TASK,
    STOP_TASK,
)

if TYPE_CHECKING:
    from orchestrator.celery_app import OrchestratorCelery

logger = logging.getLogger(__name__)
REASON_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
DB_RETRY_MAX = 100
DB_RETRY_CAP_SECONDS = 30.0


def _db_retry_countdown(retries: int) -> float:
    delay: float = min(DB_RETRY_CAP_SECONDS, 0.5 * 2**retries)
    return delay * random.uniform(0.5, 1.0)


def _traceparent(task: Task) -> str | None:  # type: ignore[type-arg]
    value = getattr(task.request, "traceparent", None)
    return value if isinstance(value, str) and len(value) <= 128 else None


def register(app: OrchestratorCelery) -> None:
    """Register every task of design.md on ``app``."""

    @app.task(name=START_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def start_session(self: Task, *args: Any, **kwargs: Any) -> dict[str, str]:  # type: ignore[type-arg]
        try:
            outcome = lifecycle.handle_start_message(
                app.lifecycle(),
                args,
                kwargs,
                claim_id=str(self.request.id),
                traceparent=_traceparent(self),
            )
        except (OperationalError, DBAPIError) as error:
            # The database is away: try this same message (same task id) again later.
            logger.warning(
                "database unavailable during start, will retry: %s", type(error).__name__
            )
            raise self.retry(
                countdown=_db_retry_countdown(self.request.retries), max_retries=DB_RETRY_MAX
            ) from None
        return {"request_id": outcome.request_id, "status": outcome.status}

    @app.task(name=STOP_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def stop_session(
        self: Task,  # type: ignore[type-arg]
        request_id: str | None = None,
        session_id: str | None = None,
        reason: str = "USER_CLOSED",
    ) -> dict[str, Any]:
        if (request_id is None) == (session_id is None) or not REASON_PATTERN.match(str(reason)):
            logger.error("invalid stop message dead-lettered (needs one id and a reason)")
            raise Reject(
                "give exactly one of request_id or session_id, and a reason", requeue=False
            )
        try:
            result = lifecycle.request_stop(
                app.lifecycle(), request_id=request_id, session_id=session_id, reason=reason
            )
        except (OperationalError, DBAPIError) as error:
            logger.warning("database unavailable during stop, will retry: %s", type(error).__name__)
            raise self.retry(
                countdown=_db_retry_countdown(self.request.retries), max_retries=DB_RETRY_MAX
            ) from None
        return {"found": result.found, "status_before": result.status_before}

    @app.task(name=REAP_TASK, acks_late=True)
    def reap_sessions() -> dict[str, int]:
        report = lifecycle.reap(app.lifecycle())
        return {"claimed": report.claimed, "stopped": report.stopped}

    @app.task(name=RECONCILE_TASK, acks_late=True)
    def reconcile_sessions() -> dict[str, int]:
        report = lifecycle.reconcile(app.lifecycle())
        return report.as_dict()

    @app.task(name=ADMIT_TASK, acks_late=True)
    def admit_waiting() -> int:
        return 0
