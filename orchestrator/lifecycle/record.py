"""Recording a vendor's yes: the write, re-read and written again within a window, or the
vendor session stopped again (compensation) when no row will own it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from orchestrator import retries, store
from orchestrator.config import lease_without_margin
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.lifecycle.outcomes import RetryLater, StartOutcome
from orchestrator.lifecycle.stop import compensate, execute_stop

# After a failed write of the vendor's yes, keep trying (re-reading the row, then writing
# again) for ORCHESTRATOR_RECORD_RETRY_SECONDS before stopping the session: a blip of the
# database should not cost a good session. A full pool is not the database's fault: it is
# waited out for longer. Neither wait may outlast what the orphan grace leaves after the
# vendor's reply (grace - vendor timeout): past it the reconciler would take the unrecorded
# session for an orphan and stop it. The numbers: retries.recording_a_start, record_windows.
# The unique constraint on ``sessions.vendor_session_id`` (migration 0001).
VENDOR_ID_CONSTRAINT = "uq_sessions_vendor_session_id"

log = logging.getLogger(__name__)


def start_deadline(lc: Lifecycle) -> float:
    """Give up in time for the attempt's lease (``START_TIMEOUT_SECONDS``): past it the
    reconciler fails a row still ``starting``, and a start that then succeeded would be
    stopped again."""
    return time.monotonic() + lease_without_margin(lc.settings.start_timeout_seconds)


def _is_outage(error: SQLAlchemyError) -> bool:
    """A failure of the connection (or of getting one), not of the statement: the write may or
    may not have happened, and the row tells which."""
    if isinstance(error, PoolTimeout):
        return True
    return isinstance(error, DBAPIError) and (
        error.connection_invalidated or isinstance(error, OperationalError | InterfaceError)
    )


@dataclass(frozen=True)
class _RecordWindow:
    """How long storing a vendor's yes may take, by the monotonic clock: an outage is retried
    until ``write_until``; a full pool (not the database's fault) until ``pool_until``. Every
    wait inside, the wait for a pooled connection included, ends by ``pool_until``: past what
    the orphan grace leaves after the vendor's reply the reconciler would take the session
    for an orphan."""

    write_until: float
    pool_until: float

    @classmethod
    def from_now(cls, lc: Lifecycle) -> _RecordWindow:
        write_seconds, wait_seconds = retries.record_windows(lc.settings)
        now = time.monotonic()
        return cls(now + write_seconds, now + wait_seconds)

    def left(self) -> float:
        return self.pool_until - time.monotonic()


def record_vendor_yes(
    lc: Lifecycle, ticket: store.StartTicket, start: store.VendorStart
) -> StartOutcome:
    """Store the vendor's yes. A write whose outcome is unknown (the connection dropped, maybe
    after the commit) is settled by reading the row again; one that did not land is written
    again for a few seconds; only then, or if the row no longer wants this session, the vendor
    session is stopped again (compensation)."""
    vendor_id = start.vendor_session_id
    try:
        result = _record_within(lc, ticket, start, _RecordWindow.from_now(lc))
    except IntegrityError as error:
        if not _names_another_rows_session(error):
            compensate(
                lc,
                vendor_id,
                request_id=ticket.request_id,
                why="database write failed",
                account=ticket.account,
            )
            raise
        return _fail_reused_session_id(lc, ticket, vendor_id)
    if result is store.Recorded.YES:
        return StartOutcome(ticket.request_id, "active", vendor_id)
    if isinstance(result, store.StopTicket):
        execute_stop(lc, result)
        return StartOutcome(ticket.request_id, "stopping", "stop requested during start")
    if result is store.NotRecorded.MOVED_ON:
        compensate(
            lc,
            vendor_id,
            request_id=ticket.request_id,
            why="request no longer starting",
            account=ticket.account,
        )
        return StartOutcome(ticket.request_id, "unchanged", "compensated")
    if result is store.NotRecorded.GONE:
        # The claim was lost (a crash of the database before it reached the disk): this
        # message must not be acknowledged, so that its redelivery claims the request again.
        compensate(
            lc, vendor_id, request_id=ticket.request_id, why="row lost", account=ticket.account
        )
        raise RetryLater("the request's row was lost; claiming it again", 0.0)
    compensate(
        lc,
        vendor_id,
        request_id=ticket.request_id,
        why="database write failed",
        account=ticket.account,
    )
    # The write may have landed with its reply lost: the retry ends the row if it holds the
    # session just stopped.
    raise RetryLater(
        "the database did not take the vendor's answer",
        1.0,
        abandoned_attempt=ticket.owner,
        stopped_vendor_session=vendor_id,
    )


def _record_within(
    lc: Lifecycle, ticket: store.StartTicket, start: store.VendorStart, window: _RecordWindow
) -> store.Recorded | store.StopTicket | store.NotRecorded | _Unknown:
    """``record_started``, re-read and written again until settled or the window closes."""
    vendor_id = start.vendor_session_id
    backoff = retries.recording_a_start(lc.settings)
    tries = 0
    result: store.Recorded | store.StopTicket | store.NotRecorded | _Unknown
    while True:
        tries += 1
        pool_full = False
        try:
            with lc.db.waits_at_most(window.left()):
                result = store.record_started(
                    lc.db, ticket, start, stop_retry_in=lc.settings.stop_retry_seconds
                )
        except IntegrityError:
            raise  # the caller tells a reused vendor id (no stop) from any other
        except SQLAlchemyError as error:
            if not _is_outage(error):
                compensate(
                    lc,
                    vendor_id,
                    request_id=ticket.request_id,
                    why="database write failed",
                    account=ticket.account,
                )
                raise
            pool_full = isinstance(error, PoolTimeout)
            result = _reread(lc, ticket, vendor_id, window)
        if result is not store.NotRecorded.PENDING and result is not _UNKNOWN:
            return result
        until = window.pool_until if pool_full else window.write_until
        pause = min(backoff.delay(tries), until - time.monotonic())
        if pause <= 0:
            return result
        time.sleep(pause)


class _Unknown:
    """The row could not be read either."""


_UNKNOWN = _Unknown()


def _reread(
    lc: Lifecycle, ticket: store.StartTicket, vendor_id: str, window: _RecordWindow
) -> store.Recorded | store.StopTicket | store.NotRecorded | _Unknown:
    try:
        with lc.db.waits_at_most(window.left()):
            return store.start_state(lc.db, ticket, vendor_id)
    except SQLAlchemyError as error:
        if not _is_outage(error):
            raise
        return _UNKNOWN


def _names_another_rows_session(error: IntegrityError) -> bool:
    diag = getattr(error.orig, "diag", None)
    return getattr(diag, "constraint_name", None) == VENDOR_ID_CONSTRAINT


def _fail_reused_session_id(
    lc: Lifecycle, ticket: store.StartTicket, vendor_id: str
) -> StartOutcome:
    """The vendor answered with a session id another request's row already holds. Stopping it
    would end that request's session, and no second session under one id can exist: nothing
    of ours bills under this request, so it fails and nothing is stopped. (If the vendor did
    make a session under some other id, it has no row and the reconciler stops it as an
    orphan.)"""
    message = "the vendor answered with a session id another request already holds"
    log.error("request %s: %s (%s); nothing stopped", ticket.request_id, message, vendor_id[:255])
    failed = store.record_failed(
        lc.db, ticket, error_code="VENDOR_BAD_REPLY", error_message=message
    )
    if failed is store.NotRecorded.GONE:
        raise RetryLater("the request's row was lost; claiming it again", 0.0)
    return StartOutcome(ticket.request_id, "failed", message)
