"""Lifecycle metrics through the OpenTelemetry metrics API (no-ops until a provider is set)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from sqlalchemy import func, select, text

from orchestrator.db import Database, SessionRow
from orchestrator.db.types import utcnow
from orchestrator.deepbrain import DeepBrainError
from orchestrator.tenants import DEFAULT_TENANT

meter = metrics.get_meter("orchestrator.lifecycle")
starts = meter.create_counter(
    "orchestrator.session.starts", unit="{start}", description="Start requests by outcome"
)
start_latency = meter.create_histogram(
    "orchestrator.session.start_latency",
    unit="s",
    description="Request received to session active (includes waiting for a slot)",
)
vendor_duration = meter.create_histogram(
    "orchestrator.vendor.duration", unit="s", description="DeepBrain calls, retries included"
)
vendor_errors = meter.create_counter(
    "orchestrator.vendor.errors", unit="{error}", description="Failed DeepBrain calls by code"
)
failed_passes = meter.create_counter(
    "orchestrator.reconcile.failed_passes",
    unit="{pass}",
    description="Reconcile passes that could not compare with the vendor, by reason",
)
skipped_passes = meter.create_counter(
    "orchestrator.beat.skipped_passes",
    unit="{pass}",
    description="Periodic passes skipped because the database was away, by task",
)
reaper_lag = meter.create_histogram(
    "orchestrator.reaper.lag", unit="s", description="expires_at to the vendor's confirmed stop"
)


account_events = meter.create_counter(
    "orchestrator.account.events",
    unit="{event}",
    description="Account health changes (circuit_opened, disabled, limit_lowered) by account",
)


tenant_admitted = meter.create_counter(
    "orchestrator.tenant.admitted",
    unit="{request}",
    description="Requests given a slot, at their claim or after waiting, by tenant",
)
tenant_wait = meter.create_histogram(
    "orchestrator.tenant.wait_time",
    unit="s",
    description="Arrival to admission of requests that waited for a slot, by tenant",
)
#: The label of every tenant without a policy row (docs/operations.md, "Metrics by tenant").
OTHER_TENANTS = "other"


class TenantLabels:
    """Tenant names come from messages, so a label per name would let any producer grow the
    metrics without bound. A tenant with a policy row (``orchestrator tenants set``) and
    ``default`` keep their names; every other is :data:`OTHER_TENANTS`. The configured names
    are read again at most every ``refresh`` seconds."""

    def __init__(self, refresh: float = 30.0) -> None:
        self._refresh = refresh
        self._names: frozenset[str] = frozenset()
        self._read_at: float | None = None
        self._lock = threading.Lock()

    def names(self, db: Database) -> frozenset[str]:
        with self._lock:
            if self._read_at is None or time.monotonic() - self._read_at >= self._refresh:
                with db.transaction() as session:
                    found = session.scalars(text("SELECT name FROM tenants")).all()
                self._names = frozenset(found) | {DEFAULT_TENANT}
                self._read_at = time.monotonic()
            return self._names

    def label(self, db: Database, tenant: str) -> str:
        return tenant if tenant in self.names(db) else OTHER_TENANTS

    def forget(self) -> None:
        """Read the configured names again at the next label (after a policy change)."""
        with self._lock:
            self._read_at = None


tenant_labels = TenantLabels()


def record_admitted(db: Database, tenant: str, waited: float | None = None) -> None:
    """A request given a slot: at its claim (``waited`` None), or after waiting that long."""
    label = {"tenant": tenant_labels.label(db, tenant)}
    tenant_admitted.add(1, label)
    if waited is not None:
        tenant_wait.record(max(0.0, waited), label)


@contextmanager
def vendor_call(endpoint: str, account: str | None = None) -> Iterator[None]:
    began = time.perf_counter()
    outcome = "ok"
    labels = (
        {"endpoint": endpoint} if account is None else {"endpoint": endpoint, "account": account}
    )
    try:
        yield
    except DeepBrainError as error:
        outcome = error.error_code
        vendor_errors.add(1, {**labels, "error_code": outcome})
        raise
    finally:
        vendor_duration.record(time.perf_counter() - began, {**labels, "outcome": outcome})


def record_account_event(account: str, event: str) -> None:
    account_events.add(1, {"account": account, "event": event})


def record_start(outcome: str, created_at: datetime | None = None) -> None:
    starts.add(1, {"outcome": outcome})
    if outcome == "active" and created_at is not None:
        start_latency.record((utcnow() - created_at).total_seconds())


def record_failed_pass(reason: str) -> None:
    """A reconcile pass that reconciled nothing (vendor_error, auth_error) or broke (error)."""
    failed_passes.add(1, {"reason": reason})


def record_skipped_pass(task: str) -> None:
    """A sweep, reconcile or admission pass skipped for a database outage (the next beat
    runs it again)."""
    skipped_passes.add(1, {"task": task})


def record_reaper_lag(seconds: float) -> None:
    """``ended_at`` - ``expires_at``, both by the database's clock."""
    reaper_lag.record(max(0.0, seconds))


def register_gauges(db: Database) -> None:
    """Live and waiting sessions, counted when the metric reader collects (worker only)."""

    def count(statuses: tuple[str, ...]) -> int:
        with db.transaction() as session:
            return session.scalar(select(func.count()).where(SessionRow.status.in_(statuses))) or 0

    def live(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(count(("starting", "active", "stopping")))

    def waiting(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(count(("waiting",)))

    meter.create_observable_gauge(
        "orchestrator.sessions.live", callbacks=[live], description="starting + active + stopping"
    )
    meter.create_observable_gauge(
        "orchestrator.sessions.waiting", callbacks=[waiting], description="waiting for a slot"
    )

    def per_account(column: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            with db.transaction() as session:
                rows = session.execute(
                    text(
                        "SELECT name, in_use, waiting, coalesce(effective_cap, -1) AS cap,"
                        " (in_catalog AND enabled AND NOT draining AND (circuit_open_until"
                        " IS NULL OR circuit_open_until <= now()))::integer AS open"
                        " FROM vendor_accounts"
                    )
                ).all()
            for row in rows:
                yield Observation(getattr(row, column), {"account": row.name})

        return observe

    for column, description in (
        ("in_use", "starting + active + stopping, per account"),
        ("waiting", "requests waiting bound to the account"),
        ("cap", "effective cap per account (-1: none known)"),
        ("open", "1 when the account takes new starts"),
    ):
        meter.create_observable_gauge(
            f"orchestrator.account.{column}",
            callbacks=[per_account(column)],
            description=description,
        )

    def per_tenant(column: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            with db.transaction() as session:
                rows = session.execute(
                    text("SELECT name, in_use, waiting FROM tenant_totals ORDER BY name")
                ).all()
            totals: dict[str, int] = {}
            for row in rows:
                label = tenant_labels.label(db, row.name)
                totals[label] = totals.get(label, 0) + int(getattr(row, column))
            for label, value in totals.items():
                yield Observation(value, {"tenant": label})

        return observe

    for column, description in (
        ("in_use", "starting + active + stopping, per tenant (unconfigured ones: other)"),
        ("waiting", "requests waiting for a slot, per tenant (unconfigured ones: other)"),
    ):
        meter.create_observable_gauge(
            f"orchestrator.tenant.{column}",
            callbacks=[per_tenant(column)],
            description=description,
        )
