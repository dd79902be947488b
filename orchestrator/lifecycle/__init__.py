"""The session lifecycle as plain functions: no Celery here, so tests call them directly."""

from orchestrator.lifecycle.admission import AdmitReport, admit_waiting
from orchestrator.lifecycle.context import DispatchAfterCommit, Lifecycle
from orchestrator.lifecycle.outcomes import RetryLater, StartOutcome
from orchestrator.lifecycle.reaper import ReapReport, reap
from orchestrator.lifecycle.reconciler import ReconcileReport, reconcile
from orchestrator.lifecycle.start import handle_start_message, run_start
from orchestrator.lifecycle.stop import StopResult, request_stop

__all__ = [
    "AdmitReport",
    "DispatchAfterCommit",
    "Lifecycle",
    "ReapReport",
    "ReconcileReport",
    "RetryLater",
    "StartOutcome",
    "StopResult",
    "admit_waiting",
    "handle_start_message",
    "reap",
    "reconcile",
    "request_stop",
    "run_start",
]
