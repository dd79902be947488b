"""The reconciler: the vendor's list is the truth about what runs (and bills).

- a row we think live that the vendor ended → ``ended`` with the vendor's ``end_reason``;
- a vendor session older than the orphan grace that no row knows → stopped
  ``ZOMBIE_SESSION_REAP`` and logged in ``session_events``;
- a row ``starting`` whose attempt's lease ran out → ``failed`` ``START_TIMEOUT`` (a vendor
  session it may have made has no row, so a later pass stops it as an orphan); a row admitted
  longer than the start timeout ago with no attempt since (its dispatch was lost) → dispatched
  again. This needs no vendor call, so it runs even when the vendor's list fails.
A 401/403 from the vendor means our key is wrong: log it loudly and change nothing.

One pass runs at a time across the deployment (a lease in ``sweep_leases``, timed by the
database's clock), and a pass stops calling the vendor at its deadline
(``Settings.reconcile_pass_seconds``) however slow the vendor is. The vendor part runs once per
account, with that account's key, under the account's own lease (``reconcile:<name>``) and
within its own share of the pass (an equal part of what is left when it starts), so one slow
or failing account cannot starve the others' orphan stops. A list that succeeds closes the
account's circuit (docs/admission.md "Health"). The vendor's values are
untrusted: a malformed row of its list is skipped and logged, an unusable value in a row reads
as missing (logged with the row's id, counted in ``orchestrator.vendor.skipped_values``), and a
row whose handling fails (the database refuses what the vendor sent) is skipped and logged: the
rest are reconciled. An orphan the vendor gives no usable creation time for is aged from the
database's first sighting of it in the list. Passes that reconcile nothing are counted in
``orchestrator.reconcile.failed_passes``.

Every vendor session on our key that no row knows is stopped: a second deployment sharing the
key loses its sessions this way. A pass finding ``MANY_ORPHANS`` or more at once says so.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta

from opentelemetry import trace
from sqlalchemy.exc import InterfaceError, OperationalError

from orchestrator import store, tracing
from orchestrator.deepbrain import (
    DeepBrainError,
    VendorAuthError,
    VendorForbidden,
    VendorNotFound,
    VendorSession,
)
from orchestrator.deepbrain.values import loggable_id
from orchestrator.lifecycle import metrics
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.lifecycle.stop import vendor_stop

logger = logging.getLogger(__name__)
PASS_LEASE_MARGIN = 5.0  # the lease outlives the pass's deadline by this much
UNKNOWN_END_REASON = "UNKNOWN"
# A row started this recently may be missing from a list fetched a moment before.
LIST_RACE_MARGIN = timedelta(seconds=5)
# Orphans found in one pass from which a warning names the count: a crash leaves a few (about
# one per start in flight); many at once usually means another deployment uses our vendor key.
MANY_ORPHANS = 10


SWEEP_NAME = "reconcile"
MAX_LEASE_NAME = 64  # sweep_leases.name
# The detail calls (rows the vendor may have ended) get this part of what is left of the pass
# once the list is read; the orphan sweep gets the rest, however slow the detail endpoint.
DETAIL_SHARE = 0.5


@dataclass
class ReconcileReport:
    vendor_ended: int = 0
    orphans_stopped: int = 0
    start_timeouts: int = 0
    redispatched: int = 0
    skipped_rows: int = 0  # rows of the list, or rows of ours, that could not be handled
    skipped_values: int = 0  # unusable values in the vendor's rows (read as missing)
    early_stops_pruned: int = 0
    auth_error: bool = False
    vendor_error: bool = False
    out_of_time: bool = False
    skipped_pass: bool = False  # another pass held the lease, or one finished just now

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}


class _AuthRefused(Exception):
    """The vendor refused our key in the middle of a pass: stop changing anything."""


class _OutOfTime(Exception):
    """The pass's deadline has passed: the rest waits for the next pass."""


def reconcile(lc: Lifecycle, *, min_spacing: float = 0.0) -> ReconcileReport:
    """One pass, unless another runs or one finished less than ``min_spacing`` seconds ago
    (beat's messages may pile up while workers are away: they then cost nothing). Every change
    is its own short transaction, no vendor call inside one."""
    with tracing.sweep_span("session.reconcile") as span:
        owner = uuid.uuid4().hex
        pass_seconds = lc.settings.reconcile_pass_seconds
        if not store.take_sweep_lease(
            lc.db, SWEEP_NAME, owner, seconds=pass_seconds + PASS_LEASE_MARGIN, spacing=min_spacing
        ):
            tracing.set_attributes(span, skipped=True)
            return ReconcileReport(skipped_pass=True)
        try:
            report = _reconcile(lc, time.monotonic() + pass_seconds)
        except Exception:
            metrics.record_failed_pass("error")
            raise
        finally:
            store.release_sweep_lease(lc.db, SWEEP_NAME, owner)
        if report.auth_error or report.vendor_error:
            metrics.record_failed_pass("auth_error" if report.auth_error else "vendor_error")
        tracing.set_attributes(span, **report.as_dict())
        if report.auth_error:
            tracing.mark_error(span, "VENDOR_AUTH")
        return report


def _reconcile(lc: Lifecycle, deadline: float) -> ReconcileReport:
    report = ReconcileReport()
    _resolve_stuck_starts(lc, report)
    report.early_stops_pruned = store.prune_early_stops(
        lc.db, older_than_seconds=lc.settings.early_stop_retention_seconds
    )
    names = sorted(lc.vendors.accounts())
    for index, name in enumerate(names):
        left = max(0.0, deadline - time.monotonic())
        share = time.monotonic() + left / (len(names) - index)
        owner = uuid.uuid4().hex
        lease = account_lease(name)
        seconds = left / (len(names) - index) + PASS_LEASE_MARGIN
        if not store.take_sweep_lease(lc.db, lease, owner, seconds=seconds, spacing=0.0):
            continue  # another pass is still on this account
        try:
            _reconcile_account(lc, name, share, report)
        finally:
            store.release_sweep_lease(lc.db, lease, owner)
    if any(report.as_dict().values()):
        logger.info("reconciler: %s", report.as_dict())
    return report


def account_lease(name: str) -> str:
    """The name of an account's reconcile lease (its ``finished_at`` is when its last list
    pass ended: docs/admission.md, "An uncertain start is not moved")."""
    if len(name) <= MAX_LEASE_NAME - len("reconcile:"):
        return f"reconcile:{name}"
    digest = hashlib.sha256(name.encode()).hexdigest()
    return f"reconcile:{digest[: MAX_LEASE_NAME - len('reconcile:')]}"


def _reconcile_account(lc: Lifecycle, name: str, deadline: float, report: ReconcileReport) -> None:
    listed_at = store.database_time(lc.db)

    def skip(why: str) -> None:
        report.skipped_rows += 1
        logger.warning("reconciler: skipped a malformed row of the vendor's list: %s", why)

    try:
        with lc.vendors.call(name, "list") as vendor:
            active = vendor.list_sessions("active", deadline=deadline, on_malformed=skip)
    except (VendorAuthError, VendorForbidden) as error:
        logger.critical(
            "reconciler: the vendor refused the key of account %s, nothing changed: %s",
            name,
            error,
        )
        report.auth_error = True
        return
    except DeepBrainError as error:
        logger.error(
            "reconciler: vendor list of account %s failed, nothing changed: %s", name, error
        )
        report.vendor_error = True
        return
    lc.vendors.note_success(name)
    store.probe_cap_up(lc.db, name, quiet_seconds=lc.settings.reconcile_interval_seconds)
    if store.release_uncertain_waits(lc.db, name, listed_at):
        lc.dispatcher.admit_waiting()  # they may go to any eligible account now
    report.skipped_values += sum(len(s.skipped) for s in active)
    listed = _Listed({s.session_id: s for s in active}, listed_at, deadline, name)
    try:
        _in_time(_close_rows_the_vendor_ended, lc, _detail_share(listed), report)
        _in_time(_stop_orphans, lc, listed, report)
    except _AuthRefused as error:
        logger.critical(
            "reconciler: the vendor refused the key of account %s, stopping here: %s", name, error
        )
        report.auth_error = True


def _resolve_stuck_starts(lc: Lifecycle, report: ReconcileReport) -> None:
    stuck = store.resolve_stuck_starts(lc.db, start_timeout=lc.settings.start_timeout_seconds)
    report.start_timeouts = len(stuck.failed)
    report.redispatched = len(stuck.redispatch)
    for session_id, claim_id in stuck.redispatch:
        logger.warning("reconciler: an admitted start was never attempted; dispatching it again")
        lc.dispatcher.start_admitted(session_id, claim_id)


def _detail_share(listed: _Listed) -> _Listed:
    """The list with the detail calls' deadline: their share of what is left of the pass."""
    now = time.monotonic()
    return replace(listed, deadline=now + max(0.0, listed.deadline - now) * DETAIL_SHARE)


def _in_time(
    step: Callable[[Lifecycle, _Listed, ReconcileReport], None],
    lc: Lifecycle,
    listed: _Listed,
    report: ReconcileReport,
) -> None:
    """One step of the pass, until its deadline; what is left waits for the next pass."""
    try:
        step(lc, listed, report)
    except _OutOfTime:
        logger.warning("reconciler: %s ran out of time; the next pass goes on", step.__name__)
        report.out_of_time = True


def _check_time(deadline: float) -> None:
    if time.monotonic() >= deadline:
        raise _OutOfTime


def _vendor_end(
    lc: Lifecycle, vendor_id: str, listed: _Listed, report: ReconcileReport
) -> tuple[str, datetime | None] | None:
    """(end reason, end time) if the vendor has ended the session, None if it still runs."""
    try:
        with lc.vendors.call(listed.account, "detail") as vendor:
            detail = vendor.get_session(vendor_id, deadline=listed.deadline)
    except VendorNotFound:
        return UNKNOWN_END_REASON, None
    except (VendorAuthError, VendorForbidden) as error:
        raise _AuthRefused(str(error)) from None
    except DeepBrainError as error:
        logger.warning("reconciler: detail of a session failed, skipped: %s", error)
        return None
    report.skipped_values += len(detail.skipped)
    if detail.end_at is None and not detail.end_reason:
        return None  # the vendor still runs it ("" is no reason); the list was just stale
    reason = (detail.end_reason or UNKNOWN_END_REASON)[: store.END_REASON_LENGTH]
    return reason, detail.end_at  # cut as the row keeps it (span attributes too)


def _describe(error: Exception) -> str:
    """An error as a log line may show it: its type and SQLSTATE, never a server message (it
    may quote the vendor's values)."""
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return type(error).__name__ + (f" (SQLSTATE {sqlstate})" if sqlstate else "")


@contextmanager
def _one_row(report: ReconcileReport, what: str, row_id: object) -> Iterator[None]:
    """A row whose handling fails is skipped and logged with its id: one bad row never ends
    the pass. The database being away does (every row would fail the same way)."""
    try:
        yield
    except (_AuthRefused, _OutOfTime, OperationalError, InterfaceError):
        raise
    except Exception as error:  # noqa: BLE001 - any failure of one row is that row's
        report.skipped_rows += 1
        logger.error("reconciler: %s %s skipped: %s", what, loggable_id(row_id), _describe(error))


@dataclass(frozen=True)
class _Listed:
    """The vendor's active list, when it was read (database clock), and the pass's deadline."""

    sessions: dict[str, VendorSession]
    at: datetime
    deadline: float
    account: str


def _close_rows_the_vendor_ended(lc: Lifecycle, listed: _Listed, report: ReconcileReport) -> None:
    sweep = trace.get_current_span()
    for row in store.live_vendor_rows(lc.db, account=listed.account):
        if row.vendor_session_id in listed.sessions:
            continue
        if row.started_at is not None and row.started_at > listed.at - LIST_RACE_MARGIN:
            continue
        _check_time(listed.deadline)
        tracing.link_sessions(sweep, [row.traceparent])
        with (
            _one_row(report, "row", str(row.session_id)),
            tracing.session_span(
                "session.reconcile.check", row.traceparent, session_id=row.vendor_session_id
            ) as span,
        ):
            ended = _vendor_end(lc, row.vendor_session_id, listed, report)
            if ended is not None and store.record_vendor_ended(
                lc.db, row.session_id, end_reason=ended[0], ended_at=ended[1]
            ):
                tracing.set_attributes(span, end_reason=ended[0])
                report.vendor_ended += 1


def _orphans(lc: Lifecycle, listed: _Listed) -> list[tuple[str, datetime]]:
    """(vendor id, since when) of each listed session no row owns that is older than the
    orphan grace. Its age runs from the vendor's ``created_at``, or, when the vendor gave none
    we can use (missing, unparseable, in the future), from the database's first sighting."""
    grace = timedelta(seconds=lc.settings.orphan_grace_seconds)
    known = store.owned_vendor_ids(
        lc.db, list(listed.sessions), ended_after=listed.at - LIST_RACE_MARGIN
    )
    unknown = {v: s for v, s in listed.sessions.items() if v not in known}
    untimed = [v for v, s in unknown.items() if s.created_at is None or s.created_at > listed.at]
    seen = store.first_sightings(lc.db, untimed)
    due = []
    for vendor_id, session in unknown.items():
        born = seen.get(vendor_id) or session.created_at
        if born is not None and born <= listed.at - grace:
            due.append((vendor_id, born))
    return due


def _stop_orphans(lc: Lifecycle, listed: _Listed, report: ReconcileReport) -> None:
    due = _orphans(lc, listed)
    if len(due) >= MANY_ORPHANS:
        logger.warning(
            "reconciler: %d vendor sessions on the key of account %s have no row here; stopping"
            " them as orphans. If another deployment uses this vendor key, these are its"
            " sessions: give each deployment its own key (docs/deploy.md)",
            len(due),
            listed.account,
        )
    for vendor_id, born in due:
        _check_time(listed.deadline)
        with _one_row(report, "orphan vendor session", vendor_id):
            try:
                outcome = vendor_stop(
                    lc,
                    vendor_id,
                    "ZOMBIE_SESSION_REAP",
                    account=listed.account,
                    deadline=listed.deadline,
                )
            except DeepBrainError as error:
                logger.error("reconciler: could not stop an orphan vendor session: %s", error)
                continue
            store.log_orphan_stop(
                lc.db,
                vendor_id,
                outcome=outcome.value,
                created_at=born.isoformat(),
                account=listed.account,
            )
            report.orphans_stopped += 1
            logger.warning("reconciler: stopped an orphan vendor session with no row")
