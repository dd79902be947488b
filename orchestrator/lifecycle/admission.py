"""Admission: never more ``starting`` + ``active`` + ``stopping`` sessions on an account than
its effective cap (ours, or the vendor's lower ``max_session_numbers``); the rest wait, first
in first out among the requests each account may serve (docs/admission.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from orchestrator import store
from orchestrator.lifecycle import metrics
from orchestrator.lifecycle.context import Lifecycle
from orchestrator.store.admitted import admitted_waits

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
    admitted = []
    for account in store.open_accounts(lc.db):
        for session_id, claim_id in store.admit(lc.db, account=account):
            lc.dispatcher.start_admitted(session_id, claim_id)
            admitted.append(session_id)
    for tenant, waited in admitted_waits(lc.db, admitted):
        metrics.record_admitted(lc.db, tenant, waited)
    return AdmitReport(len(admitted), len(expired))
