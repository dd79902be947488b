"""Client for the DeepBrain AI Streamer API (token, start, stop, list, detail).

Knows nothing of the database, Celery or the simulator. See :class:`DeepBrainClient`.
"""

from orchestrator.deepbrain.client import DeepBrainClient
from orchestrator.deepbrain.errors import (
    DeepBrainError,
    VendorAuthError,
    VendorConflict,
    VendorForbidden,
    VendorNotFound,
    VendorOutOfCredits,
    VendorRateLimited,
    VendorServerError,
    VendorUnavailable,
    VendorValidationError,
)
from orchestrator.deepbrain.models import StartedSession, StopOutcome, VendorSession
from orchestrator.deepbrain.retry import RetryPolicy

__all__ = [
    "DeepBrainClient",
    "DeepBrainError",
    "RetryPolicy",
    "StartedSession",
    "StopOutcome",
    "VendorAuthError",
    "VendorConflict",
    "VendorForbidden",
    "VendorNotFound",
    "VendorOutOfCredits",
    "VendorRateLimited",
    "VendorServerError",
    "VendorSession",
    "VendorUnavailable",
    "VendorValidationError",
]
