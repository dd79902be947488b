"""Stopping sessions at the vendor: on request, by the reaper, and as compensation."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from orchestrator import retries, store, tracing
from orchestrator.config import lease_without_margin
from orchestrator.deepbrain import DeepBrainError, StopOutcome, VendorNotFound
from orchestrator.lifecycle import metrics
from orchestrator.lifecycle.context import Lifecycle

logger = logging.getLogger(__name__)
# The audit entry of a compensation waits this long at most for a pooled connection: the pool
# may be full (a reason to compensate), and the message's retry must not wait behind it.
COMPENSATION_LOG_WAIT_SECONDS = 2.0


@dataclass(frozen=True)
class StopResult:
    found: bool
    status_before: str | None
    vendor_stopped: bool
    remembered: bool = False  # no row yet: the start, when it comes, ends the request


def request_stop(
    lc: Lifecycle,
    *,
    request_id: str | None = None,
    session_id: str | None = None,
    reason: str = "USER_CLOSED",
) -> StopResult:
    """Apply a stop; only the caller that moved the row to ``stopping`` calls the vendor."""
    if (request_id is None) == (session_id is None):
        raise ValueError("give exactly one of request_id or session_id")
    result = store.request_stop(
        lc.db,
        request_id=request_id,
        vendor_session_id=session_id,
        reason=reason,
        retry_in=lc.settings.stop_retry_seconds,
    )
    if result.remembered:
        logger.info("stop of request %s came before its start: remembered", request_id)
        return StopResult(False, None, False, remembered=True)
    if not result.found:
        logger.warning("stop for an unknown vendor session ignored")
        return StopResult(False, None, False)
    stopped = execute_stop(lc, result.ticket) if result.ticket is not None else False
    return StopResult(True, result.status_before, stopped)


def vendor_stop(
    lc: Lifecycle,
    vendor_session_id: str,
    reason: str,
    *,
    account: str | None,
    deadline: float | None = None,
) -> StopOutcome:
    """Stop at the vendor, within the stop's lease (``STOP_RETRY_SECONDS``) unless a deadline
    is given: past the lease another sweep may stop the same session. A 404 counts as gone only
    once the session's detail agrees (:func:`_confirm_gone`)."""
    if deadline is None:
        deadline = time.monotonic() + lease_without_margin(lc.settings.stop_retry_seconds)
    with lc.vendors.call(account, "stop") as vendor:
        outcome = vendor.stop_session(vendor_session_id, reason, deadline=deadline)
    if outcome is StopOutcome.NOT_FOUND:
        _confirm_gone(lc, vendor_session_id, deadline, account)
    return outcome


def _confirm_gone(
    lc: Lifecycle, vendor_session_id: str, deadline: float, account: str | None
) -> None:
    """One detail call settles a 404 on stop: a 404 there too (or an end) means gone. Our key
    refused raises VendorAuthError/VendorForbidden, and a session the vendor still shows
    running raises DeepBrainError: either way the stop is tried again, not taken as done."""
    try:
        with lc.vendors.call(account, "detail") as vendor:
            detail = vendor.get_session(vendor_session_id, deadline=deadline)
    except VendorNotFound:
        return
    if detail.end_at is None and not detail.end_reason:
        raise DeepBrainError(
            "POST /api/v2/sessions/stop", "answered 404 for a session its detail shows running"
        )


def execute_stop(lc: Lifecycle, ticket: store.StopTicket) -> bool:
    """Call the vendor for a ``stopping`` row and end it; on failure leave it for the reaper."""
    outcome = stop_at_vendor(lc, ticket)
    if outcome is None:
        return False
    return bool(finish_confirmed(lc, {ticket: outcome}))


def stop_at_vendor(lc: Lifecycle, ticket: store.StopTicket) -> StopOutcome | None:
    """The vendor stop of a ``stopping`` row; None (and a backoff recorded) if it failed."""
    with tracing.session_span(
        "session.stop",
        ticket.traceparent,
        request_id=ticket.request_id,
        session_id=ticket.vendor_session_id,
        end_reason=ticket.reason,
    ) as span:
        try:
            outcome = vendor_stop(
                lc, ticket.vendor_session_id, ticket.reason, account=ticket.account
            )
        except DeepBrainError as error:
            logger.warning("vendor stop failed for request %s: %s", ticket.request_id, error)
            tracing.mark_error(span, error.error_code)
            store.stop_failed(
                lc.db,
                ticket.session_id,
                error=str(error),
                base_delay=retries.stop_backoff(lc.settings).base,
                max_delay=retries.stop_backoff(lc.settings).cap,
            )
            return None
        tracing.set_attributes(span, vendor_outcome=outcome.value)
        return outcome


def finish_confirmed(
    lc: Lifecycle, confirmed: dict[store.StopTicket, StopOutcome]
) -> list[store.StopTicket]:
    """End the rows whose vendor stop was confirmed, in one transaction; the ones ended."""
    ended = store.finish_stops(
        lc.db, {ticket.session_id: outcome.value for ticket, outcome in confirmed.items()}
    )
    for row in ended:
        if row.end_reason == store.MAX_DURATION_REACHED and row.lag_seconds is not None:
            metrics.record_reaper_lag(row.lag_seconds)
    ended_ids = {row.session_id for row in ended}
    return [ticket for ticket in confirmed if ticket.session_id in ended_ids]


def compensate(
    lc: Lifecycle, vendor_session_id: str, *, request_id: str, why: str, account: str | None
) -> bool:
    """Stop a vendor session that no row will own (the DB write failed or the row moved on),
    with the key of the account that started it."""
    try:
        vendor_stop(lc, vendor_session_id, "ERROR", account=account)
    except DeepBrainError as error:
        logger.error(
            "compensating stop failed for request %s (the reconciler will stop it): %s",
            request_id,
            error,
        )
        return False
    logger.warning("stopped vendor session of request %s again: %s", request_id, why)
    try:
        with lc.db.waits_at_most(COMPENSATION_LOG_WAIT_SECONDS):
            store.log_compensation(lc.db, request_id, vendor_session_id, why=why)
    except Exception:  # noqa: BLE001 - the stop is what matters; the DB may be the cause
        logger.warning("could not record the compensation of request %s", request_id)
    return True
