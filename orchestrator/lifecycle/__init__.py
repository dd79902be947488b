"""The session lifecycle as plain functions: no Celery here, so tests call them directly."""

from orchestrator.lifecycle.admission import AdmitReport, admit_waiting
from orchestrator.lifecycle.context import DispatchAfterCommit, Lifecycle
from orchestrator.lifecycle.outcomes import RetryLater, StartOutcome
from orchestrator.lifecycle.reaper import ReapReport, reap
from orchestrator.lifecycle.reconciler import ReconcileReport, reconcile
from orchestrator.lifecycle.start import handle_start_message, run_start
from orchestrator.lifecycle.stop import StopResult, request_stop
from orchestrator.lifecycle.waits import EstimateReport, estimate_waits_pass

__all__ = [
    "AdmitReport",
    "DispatchAfterCommit",
    "EstimateReport",
    "Lifecycle",
    "ReapReport",
    "ReconcileReport",
    "RetryLater",
    "StartOutcome",
    "StopResult",
    "admit_waiting",
    "estimate_waits_pass",
    "handle_start_message",
    "reap",
    "reconcile",
    "request_stop",
    "run_start",
]
