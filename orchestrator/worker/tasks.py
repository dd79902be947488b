"""The tasks of the message contract (docs/messages.md), at the end of this module: thin, they
read the message and call the lifecycle. What they share is :class:`OrchestratorTask`: an
outage of the database becomes a retry (:func:`retry_when_database_is_away`), a publish the
broker refused puts the message back on its queue (:func:`requeue_when_unpublished`),
arguments are never logged, countdowns are whole seconds, and the
``orchestrator_abandoned_attempt`` and ``orchestrator_stopped_vendor_session`` headers reach
the delivery that acts on them. :func:`register` adds the tasks to an app
(:func:`orchestrator.worker.celery_app.create_app`)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeAlias

from celery import Task
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from orchestrator import lifecycle, retries
from orchestrator.config import Settings
from orchestrator.contract import is_valid_stop_reason
from orchestrator.errors import OrchestratorError
from orchestrator.lifecycle import metrics
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
from orchestrator.worker import tenant_binding
from orchestrator.worker.app import OrchestratorCelery

logger = logging.getLogger(__name__)
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
    again the same way. After ``ORCHESTRATOR_DB_OUTAGE_RETRIES`` retries the message is
    dead-lettered, and nothing of its arguments is logged (they may hold the customer's keys).
    The policy's numbers: :func:`orchestrator.retries.database_outage`."""
    try:
        yield
    except lifecycle.RetryLater as later:
        headers = {
            ABANDONED_ATTEMPT_HEADER: later.abandoned_attempt or "",
            STOPPED_VENDOR_SESSION_HEADER: later.stopped_vendor_session or "",
        }
        _retry(task, later.delay, str(later), headers)
    except (PoolTimeout, DBAPIError) as error:
        _retry(task, _backoff(task), _outage(task, error), _carried(task))


def _retry(
    task: AnyTask, delay: float, why: str, headers: dict[str, str] | None = None
) -> NoReturn:
    """:func:`_republish`, keeping the tenant the broker vouched for (tenant_binding)."""
    carried_headers, properties = tenant_binding.retry_carry(task.request, _settings(task))
    _republish(task, delay, why, {**(headers or {}), **carried_headers}, properties)


@contextmanager
def skipped_when_database_is_away(task: AnyTask) -> Iterator[None]:
    """For beat's periodic passes (sweep, reconcile, admission backstop): an outage of the
    database skips this pass and acks its message; the next beat runs it again. Retrying or
    dead-lettering it would only pile up passes the next tick makes redundant, and flood
    ``orchestrator.dead``, whose every message should mean a request needing a look."""
    try:
        yield
    except (PoolTimeout, DBAPIError) as error:
        why = _outage(task, error)
        logger.warning("%s: %s; pass skipped, the next beat runs it again", task.name, why)
        metrics.record_skipped_pass(task.name)


def _outage(task: AnyTask, error: PoolTimeout | DBAPIError) -> str:
    """Why the database is away, or raise StorageError when it is there and refused the
    statement (a bug or a constraint: dead-lettered, not retried)."""
    if isinstance(error, PoolTimeout):
        return "no free database connection in this worker"
    if not error.connection_invalidated and not isinstance(
        error, OperationalError | InterfaceError
    ):
        sqlstate = getattr(error.orig, "sqlstate", None) or "unknown"
        logger.error(
            "%s: database error %s (SQLSTATE %s)", task.name, type(error).__name__, sqlstate
        )
        raise StorageError(f"{type(error).__name__} (SQLSTATE {sqlstate})") from None
    return f"database unavailable ({type(error.orig).__name__})"


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
    backoff, _ = retries.database_outage(_settings(task))
    return backoff.delay(int(task.request.retries) + 1)


def _republish(
    task: AnyTask, delay: float, why: str, headers: dict[str, str], properties: dict[str, str]
) -> NoReturn:
    _, limit = retries.database_outage(_settings(task))
    if task.request.retries >= limit:
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
    options: dict[str, Any] = dict(properties)  # AMQP properties (user_id) of the retry
    raise task.retry(
        countdown=countdown, max_retries=limit + 1, headers=headers, **options
    ) from None


def _settings(task: AnyTask) -> Settings | None:
    settings = getattr(task.app, "settings", None)
    return settings if isinstance(settings, Settings) else None


def _topology(task: AnyTask) -> Topology:
    settings = _settings(task)
    return topology(settings) if settings is not None else Topology("classic")


def _traceparent(task: AnyTask) -> str | None:
    value = getattr(task.request, "traceparent", None)
    return value if isinstance(value, str) and len(value) <= 128 else None


def _abandoned_attempt(task: AnyTask) -> str | None:
    value = getattr(task.request, ABANDONED_ATTEMPT_HEADER, None)
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def _stopped_vendor_session(task: AnyTask) -> str | None:
    value = getattr(task.request, STOPPED_VENDOR_SESSION_HEADER, None)
    return value if isinstance(value, str) and 0 < len(value) <= 255 else None


class OrchestratorTask(Task):  # type: ignore[type-arg]
    """The base of every task of the contract. Celery's own retry options are not used: our
    retry (:func:`_retry`) logs no arguments and counts its own limit; acks_late and
    reject_on_worker_lost come from the global config (``celery_app.celery_config``)."""

    @property
    def orchestrator(self) -> OrchestratorCelery:
        app = self.app
        assert isinstance(app, OrchestratorCelery)
        return app

    def lifecycle(self) -> lifecycle.Lifecycle:
        return self.orchestrator.lifecycle()

    @contextmanager
    def guarded(self, *, outage_retries: bool = True) -> Iterator[None]:
        """Run a step of this task: a refused publish requeues the message; an outage of the
        database (or RetryLater) retries it later with ``outage_retries``, else skips it."""
        with requeue_when_unpublished(self.name):
            if outage_retries:
                with retry_when_database_is_away(self):
                    yield
            else:
                with skipped_when_database_is_away(self):
                    yield

    def traceparent(self) -> str | None:
        return _traceparent(self)

    def abandoned_attempt(self) -> str | None:
        return _abandoned_attempt(self)

    def stopped_vendor_session(self) -> str | None:
        return _stopped_vendor_session(self)


def start_session(task: OrchestratorTask, *args: Any, **kwargs: Any) -> dict[str, str]:
    """A start message: claim the request, call the vendor, record the answer."""
    with task.guarded():
        outcome = lifecycle.handle_start_message(
            task.lifecycle(),
            args,
            kwargs,
            claim_id=str(task.request.id),
            traceparent=task.traceparent(),
            abandoned_attempt=task.abandoned_attempt(),
            stopped_vendor_session=task.stopped_vendor_session(),
            vouched_tenant=_vouched(task),
        )
    return {"request_id": outcome.request_id, "status": outcome.status}


def _vouched(task: AnyTask) -> str | None:
    settings = _settings(task)
    if settings is None or not settings.tenant_from_user_id:
        return None
    return tenant_binding.vouched_tenant(task.request, settings)


def start_admitted(task: OrchestratorTask, session_id: str, claim_id: str) -> dict[str, str]:
    """The vendor start of a row admission moved to ``starting``."""
    with task.guarded():
        outcome = lifecycle.run_start(
            task.lifecycle(),
            uuid.UUID(session_id),
            claim_id,
            task.abandoned_attempt(),
            stopped_vendor_session=task.stopped_vendor_session(),
        )
    return {"request_id": outcome.request_id, "status": outcome.status}


def stop_session(
    task: OrchestratorTask,
    request_id: str | None = None,
    session_id: str | None = None,
    reason: str = "USER_CLOSED",
) -> dict[str, Any]:
    """A stop message (one of ``request_id`` or ``session_id``, and a reason)."""
    if (request_id is None) == (session_id is None) or not is_valid_stop_reason(reason):
        logger.error("invalid stop message dead-lettered (needs one id and a reason)")
        raise Reject("give exactly one of request_id or session_id, and a reason", requeue=False)
    with task.guarded():
        result = lifecycle.request_stop(
            task.lifecycle(), request_id=request_id, session_id=session_id, reason=reason
        )
    return {"found": result.found, "status_before": result.status_before}


SKIPPED: dict[str, int] = {"skipped": 1}  # a periodic pass the database's outage skipped


def reap_sessions(task: OrchestratorTask) -> dict[str, int]:
    """Beat's sweep: end what expired (a failed sweep waits for the next beat)."""
    with task.guarded(outage_retries=False):
        report = lifecycle.reap(
            task.lifecycle(), plan_ahead=task.orchestrator.settings.reaper_interval_seconds
        )
        return {"claimed": report.claimed, "stopped": report.stopped}
    return SKIPPED


def reconcile_sessions(task: OrchestratorTask) -> dict[str, int]:
    """Beat's comparison with the vendor's list."""
    settings = task.orchestrator.settings
    with task.guarded(outage_retries=False):
        return lifecycle.reconcile(
            task.lifecycle(), min_spacing=settings.reconcile_interval_seconds / 2
        ).as_dict()
    return SKIPPED


def publish_events(task: OrchestratorTask) -> None:
    """Relay the outbox now (after a commit, and beat's backstop)."""
    task.orchestrator.dispatcher.relay.relay_now()


#: Beat's wait-estimate pass is an admission backstop message with this header set
#: (celery_app.celery_config): a worker of a release without the estimate runs the
#: admission pass it knows instead of dead-lettering a task it does not know.
ESTIMATE_WAITS_HEADER = "orchestrator_estimate_waits"


def admit_waiting(task: OrchestratorTask) -> dict[str, int]:
    """An admission pass: waiting requests into free slots; with the estimate header, then
    every request still waiting gets its expected wait (lifecycle.waits)."""
    with task.guarded(outage_retries=False):
        report = lifecycle.admit_waiting(task.lifecycle())
        done = {"admitted": report.admitted, "expired": report.expired}
        if _asks_for_estimates(task):
            done |= lifecycle.estimate_waits_pass(task.lifecycle()).as_dict()
        return done
    return SKIPPED


def _asks_for_estimates(task: AnyTask) -> bool:
    """The estimate header, as a worker delivers it (an attribute of the request) or as an
    eager call passes it (in ``request.headers``)."""
    headers = getattr(task.request, "headers", None) or {}
    value = getattr(task.request, ESTIMATE_WAITS_HEADER, None) or headers.get(ESTIMATE_WAITS_HEADER)
    return value == "1"


TASKS: dict[str, Callable[..., Any]] = {
    START_TASK: start_session,
    START_ADMITTED_TASK: start_admitted,
    STOP_TASK: stop_session,
    REAP_TASK: reap_sessions,
    RECONCILE_TASK: reconcile_sessions,
    PUBLISH_EVENTS_TASK: publish_events,
    ADMIT_TASK: admit_waiting,
}


def register(app: OrchestratorCelery) -> None:
    """Add every task of the contract to ``app`` (its options are the global config's)."""
    for name, function in TASKS.items():
        app.task(name=name, shared=False, bind=True, base=OrchestratorTask)(function)
