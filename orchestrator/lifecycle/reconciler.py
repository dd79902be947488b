"""The reconciler: the vendor's list is the truth about what runs (and bills).

- a row we think live that the vendor ended → ``ended`` with the vendor's ``end_reason``;
- a vendor session older than the orphan grace that no row knows → stopped
  ``ZOMBIE_SESSION_REAP`` and logged in ``session_events``;
- a row ``starting`` past the start timeout → ``failed`` ``START_TIMEOUT`` (a vendor session
  it may have made has no row, so the next pass stops it as an orphan).
A 401/403 from the vendor means our key is wrong: log it loudly and change nothing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from opentelemetry import trace

from orchestrator.deepbrain import (
    DeepBrainError,
    VendorAuthError,
    VendorForbidden,
    VendorNotFound,
    VendorSession,
)
from orchestrator.lifecycle import metrics, store, tracing
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.lifecycle.stop import vendor_stop

logger = logging.getLogger(__name__)
UNKNOWN_END_REASON = "UNKNOWN"
# A row started this recently may be missing from a list fetched a moment before.
LIST_RACE_MARGIN = timedelta(seconds=5)


@dataclass
class ReconcileReport:
    vendor_ended: int = 0
    orphans_stopped: int = 0
    start_timeouts: int = 0
    auth_error: bool = False
    vendor_error: bool = False

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}


class _AuthRefused(Exception):
    """The vendor refused our key in the middle of a pass: stop changing anything."""


def reconcile(lc: Lifecycle) -> ReconcileReport:
    """One pass; every change is its own short transaction, no vendor call inside one."""
    with tracing.sweep_span("session.reconcile") as span:
        report = _reconcile(lc)
        tracing.set_attributes(span, **report.as_dict())
        if report.auth_error:
            tracing.mark_error(span, "VENDOR_AUTH")
        return report


def _reconcile(lc: Lifecycle) -> ReconcileReport:
    report = ReconcileReport()
    listed_at = datetime.now(UTC)
    try:
        with metrics.vendor_call("list"):
            active = lc.vendor.list_sessions("active")
    except (VendorAuthError, VendorForbidden) as error:
        logger.critical("reconciler: the vendor refused our key, nothing changed: %s", error)
        report.auth_error = True
        return report
    except DeepBrainError as error:
        logger.error("reconciler: vendor list failed, nothing changed: %s", error)
        report.vendor_error = True
        return report
    vendor_active = {s.session_id: s for s in active}
    try:
        report.vendor_ended = _close_rows_the_vendor_ended(lc, vendor_active, listed_at)
    except _AuthRefused as error:
        logger.critical("reconciler: the vendor refused our key, stopping here: %s", error)
        report.auth_error = True
        return report
    report.orphans_stopped = _stop_orphans(lc, vendor_active, listed_at)
    report.start_timeouts = len(
        store.fail_stuck_starts(
            lc.db, older_than=listed_at - timedelta(seconds=lc.settings.start_timeout_seconds)
        )
    )
    if report.vendor_ended or report.orphans_stopped or report.start_timeouts:
        logger.info("reconciler: %s", report.as_dict())
    return report


def _vendor_end(lc: Lifecycle, vendor_id: str) -> tuple[str, datetime | None] | None:
    """(end reason, end time) if the vendor has ended the session, None if it still runs."""
    try:
        with metrics.vendor_call("detail"):
            detail = lc.vendor.get_session(vendor_id)
    except VendorNotFound:
        return UNKNOWN_END_REASON, None
    except (VendorAuthError, VendorForbidden) as error:
        raise _AuthRefused(str(error)) from None
    except DeepBrainError as error:
        logger.warning("reconciler: detail of a session failed, skipped: %s", error)
        return None
    if detail.end_at is None and detail.end_reason is None:
        return None  # the vendor still runs it; the list was just stale
    return detail.end_reason or UNKNOWN_END_REASON, detail.end_at


def _close_rows_the_vendor_ended(
    lc: Lifecycle, vendor_active: dict[str, VendorSession], listed_at: datetime
) -> int:
    closed = 0
    sweep = trace.get_current_span()
    for row in store.live_vendor_rows(lc.db):
        if row.vendor_session_id in vendor_active:
            continue
        if row.started_at is not None and row.started_at > listed_at - LIST_RACE_MARGIN:
            continue
        tracing.link_sessions(sweep, [row.traceparent])
        with tracing.session_span(
            "session.reconcile.check", row.traceparent, session_id=row.vendor_session_id
        ) as span:
            ended = _vendor_end(lc, row.vendor_session_id)
            if ended is not None and store.record_vendor_ended(
                lc.db, row.session_id, end_reason=ended[0], ended_at=ended[1]
            ):
                tracing.set_attributes(span, end_reason=ended[0])
                closed += 1
    return closed


def _stop_orphans(
    lc: Lifecycle, vendor_active: dict[str, VendorSession], listed_at: datetime
) -> int:
    grace = timedelta(seconds=lc.settings.orphan_grace_seconds)
    known = store.owned_vendor_ids(
        lc.db, list(vendor_active), ended_after=listed_at - LIST_RACE_MARGIN
    )
    stopped = 0
    for vendor_id, listed in vendor_active.items():
        if vendor_id in known or listed.created_at is None:
            continue
        if listed.created_at > listed_at - grace:
            continue
        try:
            outcome = vendor_stop(lc, vendor_id, "ZOMBIE_SESSION_REAP")
        except DeepBrainError as error:
            logger.error("reconciler: could not stop an orphan vendor session: %s", error)
            continue
        store.log_orphan_stop(
            lc.db, vendor_id, outcome=outcome.value, created_at=listed.created_at.isoformat()
        )
        stopped += 1
        logger.warning("reconciler: stopped an orphan vendor session with no row")
    return stopped
