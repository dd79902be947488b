"""A stop racing the reaper and the reconciler: one terminal transition, one vendor stop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from orchestrator.db import SessionRow
from orchestrator.lifecycle import Lifecycle, handle_start_message, reap, reconcile, request_stop
from orchestrator.simulator import SimulatorServer
from tests.helpers import event_kinds, row
from tests.threads import race

pytestmark = pytest.mark.postgres
ROUNDS = 15
SESSIONS_PER_ROUND = 4


def test_stop_reaper_and_reconciler_race_on_the_same_sessions(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    simulator.configure(endpoint_latency="stop=0.02,list=0.01,detail=0.01")
    for round_no in range(ROUNDS):
        ids = [f"race-{round_no}-{i}" for i in range(SESSIONS_PER_ROUND)]
        for rid in ids:
            handle_start_message(lifecycle, (), {"avatar_id": "a", "request_id": rid}, claim_id=rid)
        past = datetime.now(UTC) - timedelta(seconds=30)
        with lifecycle.db.transaction() as session:
            session.execute(
                update(SessionRow)
                .where(SessionRow.request_id.in_(ids))
                .values(expires_at=past, started_at=past)
            )
        forward, backward, _, reconciled = race(
            lambda ids=ids: [request_stop(lifecycle, request_id=r) for r in ids],
            lambda ids=ids: [request_stop(lifecycle, request_id=r) for r in reversed(ids)],
            lambda: reap(lifecycle),
            lambda: reconcile(lifecycle),
        )
        # Every action ran to its end (race() raises what a thread raised): both stoppers found
        # every row, and the reconciler saw no orphan (every vendor session has its row).
        assert all(result.found for result in forward + backward)
        assert reconciled.orphans_stopped == 0

        vendor = {s["session_id"]: s for s in simulator.sessions()}
        for rid in ids:
            r = row(lifecycle.db, rid)
            assert r.status == "ended", (rid, r.status)
            assert r.end_reason in ("USER_CLOSED", "MAX_DURATION_REACHED")
            assert event_kinds(lifecycle.db, rid).count("ended") == 1
            assert vendor[r.vendor_session_id]["stop_calls"] == 1, rid
            assert vendor[r.vendor_session_id]["end_reason"] == r.end_reason
