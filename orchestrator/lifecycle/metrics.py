"""Lifecycle metrics through the OpenTelemetry metrics API (no-ops until a provider is set)."""

from __future__ import annotations

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
