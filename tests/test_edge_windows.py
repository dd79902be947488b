"""Windows of the start and stop paths that only a step-by-step test opens wide: a stop
between the claim and the vendor call, a full pool while recording a start, a lost commit
reply during a long outage, stops and their leases, admission without scanning history."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.lifecycle import Lifecycle, request_stop, store
from orchestrator.lifecycle.start import start_claimed
from orchestrator.simulator import SimulatorServer
from tests.helpers import outbox_bodies, row

pytestmark = pytest.mark.postgres


def claim(lc: Lifecycle, request_id: str) -> store.Claim:
    """The claim step of a start message, as the worker runs it."""
    payload: dict[str, Any] = {"avatar_id": "avatar-a", "request_id": request_id}
    return store.claim(
        lc.db,
        store.ClaimRequest(
            request_id=request_id,
            claim_id=f"task-{request_id}",
            payload=payload,
            digest=f"digest-{request_id}",
            avatar_id="avatar-a",
            metadata=None,
            max_duration_seconds=None,
            start_deadline_seconds=None,
            traceparent=None,
        ),
        max_concurrent_sessions=lc.settings.max_concurrent_sessions,
        lease_seconds=lc.settings.start_timeout_seconds,
    )


# -- a stop between the claim and the vendor call --------------------------------------------


def test_a_stop_between_the_claim_and_the_vendor_call_ends_the_row_without_a_call(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    claimed = claim(lifecycle, "between")
    assert claimed.ticket is not None  # admitted at once: the vendor call comes next
    stopped = request_stop(lifecycle, request_id="between", reason="USER_CLOSED")
    assert stopped.found and stopped.status_before == "starting"

    outcome = start_claimed(lifecycle, claimed.ticket)

    assert outcome.status == "ended"
    assert simulator.stats()["endpoints"]["start"]["calls"] == 0
    assert simulator.sessions() == []
    r = row(lifecycle.db, "between")
    assert (r.status, r.end_reason, r.vendor_session_id) == ("ended", "USER_CLOSED", None)
    assert [b["status"] for b in outbox_bodies(lifecycle.db, "between")] == ["ended"]
