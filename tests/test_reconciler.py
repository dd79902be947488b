"""The reconciler against real Postgres and the simulator."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import update

from orchestrator.config import Settings
from orchestrator.db import Database, SessionRow
from orchestrator.lifecycle import Lifecycle, handle_start_message, reconcile
from orchestrator.lifecycle.inline import inline_lifecycle
from orchestrator.simulator import SimulatorServer
from tests.conftest import APP_ID, USER_KEY
from tests.helpers import events, row

pytestmark = pytest.mark.postgres


def backdate_start(db: Database, seconds: float = 60) -> None:
    with db.transaction() as session:
        session.execute(
            update(SessionRow).values(started_at=datetime.now(UTC) - timedelta(seconds=seconds))
        )


def start_behind_our_back(simulator: SimulatorServer) -> str:
    base = simulator.base_url
    token = httpx.post(
        f"{base}/api/v2/sessions/token", json={"appId": APP_ID, "userKey": USER_KEY}
    ).json()["data"]["session_token"]
    reply = httpx.post(
        f"{base}/api/v2/sessions/start",
        json={"avatar_id": "rogue"},
        headers={"Authorization": f"Bearer {token}"},
    )
    return str(reply.json()["data"]["session_id"])


def test_session_the_vendor_ended_idle_is_ended_with_its_reason(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    handle_start_message(lifecycle, (), {"avatar_id": "a", "request_id": "idle"}, claim_id="t-1")
    vendor_id = row(lifecycle.db, "idle").vendor_session_id
    simulator.end_session(vendor_id, "IDLE_TIMEOUT")
    backdate_start(lifecycle.db)

    report = reconcile(lifecycle)

    assert report.vendor_ended == 1
    r = row(lifecycle.db, "idle")
    assert (r.status, r.end_reason) == ("ended", "IDLE_TIMEOUT")
    assert r.ended_at is not None and r.livekit_token is None
    assert simulator.sessions()[0]["stop_calls"] == 0  # nothing to stop: the vendor ended it


def test_orphan_vendor_session_is_stopped_as_zombie(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    handle_start_message(lifecycle, (), {"avatar_id": "a", "request_id": "ours"}, claim_id="t-1")
    rogue = start_behind_our_back(simulator)

    report = reconcile(lifecycle)

    assert report.orphans_stopped == 1
    by_id = {s["session_id"]: s for s in simulator.sessions()}
    assert (by_id[rogue]["status"], by_id[rogue]["end_reason"]) == ("ended", "ZOMBIE_SESSION_REAP")
    assert by_id[row(lifecycle.db, "ours").vendor_session_id]["status"] == "active"
    (event,) = events(lifecycle.db, "orphan_stopped")
    assert event["vendor_session_id"] == rogue and event["session_id"] is None


def test_young_orphan_is_left_alone_within_the_grace(
    settings_for: Callable[..., Settings], db: Database, simulator: SimulatorServer
) -> None:
    lc = inline_lifecycle(settings_for(orphan_grace_seconds=60))
    try:
        rogue = start_behind_our_back(simulator)
        assert reconcile(lc).orphans_stopped == 0
        assert {s["session_id"]: s for s in simulator.sessions()}[rogue]["status"] == "active"
    finally:
        lc.close()


def test_auth_error_changes_nothing(
    settings_for: Callable[..., Settings], lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    handle_start_message(lifecycle, (), {"avatar_id": "a", "request_id": "r-1"}, claim_id="t-1")
    simulator.end_session(row(lifecycle.db, "r-1").vendor_session_id, "IDLE_TIMEOUT")
    start_behind_our_back(simulator)
    backdate_start(lifecycle.db)
    wrong_key = inline_lifecycle(settings_for(deepbrain_user_key="not-the-key"))
    try:
        report = reconcile(wrong_key)
    finally:
        wrong_key.close()
    assert report.auth_error
    assert row(lifecycle.db, "r-1").status == "active"
    assert [s["status"] for s in simulator.sessions() if s["avatar_id"] == "rogue"] == ["active"]
