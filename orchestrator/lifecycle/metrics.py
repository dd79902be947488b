"""Lifecycle metrics through the OpenTelemetry metrics API (no-ops until a provider is set)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from sqlalchemy import func, select

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


@contextmanager
def vendor_call(endpoint: str) -> Iterator[None]:
    began = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except DeepBrainError as error:
        outcome = error.error_code
        vendor_errors.add(1, {"endpoint": endpoint, "error_code": outcome})
        raise
    finally:
        vendor_duration.record(
            time.perf_counter() - began, {"endpoint": endpoint, "outcome": outcome}
        )


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
