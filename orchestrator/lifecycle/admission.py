"""Admission: never more ``starting`` + ``active`` + ``stopping`` sessions than the effective
cap (ours, or the vendor's lower ``max_session_numbers``); the rest wait, first in first out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from orchestrator import store
from orchestrator.lifecycle.context import Lifecycle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdmitReport:
    admitted: int
    expired: int


def admit_waiting(lc: Lifecycle) -> AdmitReport:
    """Fail waiting requests past their deadline, then fill the free slots in arrival order."""
    expired = store.expire_waiting(lc.db)
    if expired:
        logger.warning("%d waiting request(s) failed with CAPACITY_TIMEOUT", len(expired))
    admitted = store.admit(lc.db, configured_cap=lc.settings.max_concurrent_sessions)
    for session_id, claim_id in admitted:
        lc.dispatcher.start_admitted(session_id, claim_id)
    return AdmitReport(len(admitted), len(expired))
