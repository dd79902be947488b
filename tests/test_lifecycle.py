"""The lifecycle functions against real Postgres and the simulator (no broker needed)."""

from __future__ import annotations

from concurrent.futures import Future
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from sqlalchemy import update

from orchestrator import store
from orchestrator.db import SessionRow
from orchestrator.lifecycle import Lifecycle, handle_start_message, reap, request_stop
from orchestrator.simulator import SimulatorServer
from tests.conftest import wait_until
from tests.helpers import event_kinds, events, row, row_or_none, rows
from tests.threads import in_background, race

pytestmark = pytest.mark.postgres


def start(lc: Lifecycle, claim_id: str = "task-1", **kwargs: object) -> str:
    kwargs.setdefault("avatar_id", "avatar-a")
    return handle_start_message(lc, (), dict(kwargs), claim_id=claim_id).request_id


def test_start_stores_credentials_and_expiry(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    before = datetime.now(UTC)
    start(lifecycle, request_id="r-1", max_session_duration=3, max_duration_seconds=90)

    r = row(lifecycle.db, "r-1")
    assert r.status == "active"
    vendor = simulator.sessions()
    assert len(vendor) == 1
    assert r.vendor_session_id == vendor[0]["session_id"]
    assert r.livekit_url and r.livekit_room and r.livekit_token and r.voice_id
    claims = jwt.decode(r.livekit_token, options={"verify_signature": False})
    assert r.livekit_token_expires_at == datetime.fromtimestamp(claims["exp"], UTC)
    assert claims["video"]["room"] == r.livekit_room
    assert r.granted_max_duration_minutes == 3
    assert r.max_session_numbers == simulator.config.max_concurrent_sessions
    assert r.attempts == 1
    # The orchestrator's cap (90 s) is shorter than the vendor's grant (3 min).
    assert r.expires_at is not None and r.start_sent_at is not None
    assert r.expires_at - r.start_sent_at == timedelta(seconds=90)
    assert before <= r.start_sent_at <= datetime.now(UTC)
    # Only the documented fields reach the vendor.
    assert vendor[0]["request_body"] == {"avatar_id": "avatar-a", "max_session_duration": 3}


def test_max_duration_seconds_alone_sends_rounded_up_minutes(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    start(lifecycle, request_id="r-1", max_duration_seconds=61)
    assert simulator.sessions()[0]["request_body"]["max_session_duration"] == 2
    r = row(lifecycle.db, "r-1")
    assert r.expires_at - r.start_sent_at == timedelta(seconds=61)


def test_persona_unknown_nested_fields_pass_through_and_secrets_are_removed(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    persona = {
        "language": "en",
        "future_field": {"x": 1},
        "llm_configurations": {
            "provider": "custom",
            "custom_http": {
                "endpoint": "https://llm.example/v1",
                "headers": {"Authorization": "Bearer sk-customer-secret"},
                "auth_plugins": [{"kind": "x", "key": "sk-plugin-secret"}],
            },
        },
    }
    start(lifecycle, request_id="r-1", avatar_persona=persona)
    assert simulator.sessions()[0]["request_body"]["avatar_persona"] == persona
    stored = row(lifecycle.db, "r-1").request_payload
    assert "sk-customer-secret" not in str(stored) and "sk-plugin-secret" not in str(stored)
    assert stored["avatar_persona"]["future_field"] == {"x": 1}


def test_same_request_twice_makes_one_vendor_session(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    start(lifecycle, claim_id="t-1", request_id="same")
    outcome = handle_start_message(
        lifecycle, (), {"avatar_id": "avatar-a", "request_id": "same"}, claim_id="t-2"
    )
    assert outcome.detail == "duplicate"
    # A redelivery of the first message (same task id) once it is recorded: nothing new either.
    start(lifecycle, claim_id="t-1", request_id="same")
    assert len(simulator.sessions()) == 1
    assert len(rows(lifecycle.db)) == 1
    assert "duplicate" in event_kinds(lifecycle.db, "same")


def test_same_request_id_other_payload_is_a_recorded_conflict(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    start(lifecycle, claim_id="t-1", request_id="same", avatar_id="first")
    first = row(lifecycle.db, "same")
    outcome = handle_start_message(
        lifecycle, (), {"avatar_id": "second", "request_id": "same"}, claim_id="t-2"
    )
    assert outcome.detail == "conflict"
    after = row(lifecycle.db, "same")
    assert (after.avatar_id, after.status, after.vendor_session_id) == (
        "first",
        "active",
        first.vendor_session_id,
    )
    assert len(simulator.sessions()) == 1
    assert event_kinds(lifecycle.db, "same").count("duplicate_conflict") == 1


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "'avatar_id' is required"),
        ({"avatar_id": ""}, "'avatar_id'"),
        ({"avatar_id": "a", "colour": "red"}, "unknown field 'colour'"),
        ({"avatar_id": "a", "max_session_duration": 0}, "'max_session_duration'"),
        ({"avatar_id": "a", "max_session_duration": 61}, "at most 60 minutes"),
        ({"avatar_id": "a", "max_session_duration": "10"}, "'max_session_duration'"),
        ({"avatar_id": "a", "max_duration_seconds": 86_401}, "'max_duration_seconds'"),
        ({"avatar_id": "a", "avatar_persona": {"language": 5}}, "'avatar_persona.language'"),
        ({"avatar_id": "a", "metadata": {"x": "y" * 17_000}}, "'metadata'"),
    ],
)
def test_invalid_payload_becomes_a_failed_row_naming_the_field(
    lifecycle: Lifecycle, simulator: SimulatorServer, kwargs: dict[str, object], expected: str
) -> None:
    handle_start_message(lifecycle, (), {"request_id": "bad-1", **kwargs}, claim_id="t-9")
    r = row(lifecycle.db, "bad-1")
    assert (r.status, r.error_code) == ("failed", "VALIDATION_ERROR")
    assert expected in (r.error_message or "")
    assert simulator.sessions() == []


def test_invalid_request_id_falls_back_to_the_task_id(lifecycle: Lifecycle) -> None:
    handle_start_message(
        lifecycle, (), {"avatar_id": "a", "request_id": "has space"}, claim_id="t-7"
    )
    r = row(lifecycle.db, "t-7")
    assert r.status == "failed" and "'request_id'" in (r.error_message or "")


def test_vendor_error_fails_with_vendor_code_and_message(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    simulator.push_fault(
        {"endpoint": "start", "status": 402, "code": 4020, "message": "out of credits"}
    )
    start(lifecycle, request_id="r-1")
    r = row(lifecycle.db, "r-1")
    assert (r.status, r.error_code) == ("failed", "VENDOR_4020")
    assert "out of credits" in (r.error_message or "")
    assert r.ended_at is not None and r.livekit_token is None


def start_with_the_vendor_call_in_flight(lc: Lifecycle, request_id: str) -> Future[str]:
    """Start in a thread and return once its (slow) vendor call has been sent; the future
    gives what the start returned, or raises what it raised."""
    started = in_background(lambda: start(lc, request_id=request_id))
    wait_until(
        lambda: (r := row_or_none(lc.db, request_id)) is not None and r.attempts > 0, 5, 0.01
    )
    return started


def test_stop_of_active_session_stops_vendor_once(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    start(lifecycle, request_id="r-1")
    results = [request_stop(lifecycle, request_id="r-1") for _ in range(3)]
    assert [r.status_before for r in results] == ["active", "ended", "ended"]
    r = row(lifecycle.db, "r-1")
    assert (r.status, r.end_reason, r.livekit_token) == ("ended", "USER_CLOSED", None)
    (vendor,) = simulator.sessions()
    assert (vendor["status"], vendor["end_reason"], vendor["stop_calls"]) == (
        "ended",
        "USER_CLOSED",
        1,
    )
    assert event_kinds(lifecycle.db, "r-1").count("ended") == 1


def test_concurrent_stops_make_one_terminal_transition(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    for i in range(5):
        start(lifecycle, claim_id=f"t-{i}", request_id=f"r-{i}")

    def stop_all() -> list[bool]:
        return [
            request_stop(lifecycle, request_id=f"r-{i}", reason="USER_CLOSED").found
            for i in range(5)
        ]

    assert race(*[stop_all] * 8) == [[True] * 5] * 8
    assert all(s["stop_calls"] == 1 for s in simulator.sessions())
    for i in range(5):
        assert event_kinds(lifecycle.db, f"r-{i}").count("ended") == 1


def test_stop_by_vendor_session_id(lifecycle: Lifecycle, simulator: SimulatorServer) -> None:
    start(lifecycle, request_id="r-1")
    vendor_id = row(lifecycle.db, "r-1").vendor_session_id
    assert request_stop(lifecycle, session_id=vendor_id, reason="ERROR").found
    assert row(lifecycle.db, "r-1").end_reason == "ERROR"
    assert simulator.sessions()[0]["end_reason"] == "ERROR"


def test_stop_requested_while_starting_is_honoured_once_the_session_has_an_id(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    simulator.configure(endpoint_latency="start=1.0")
    started = start_with_the_vendor_call_in_flight(lifecycle, "r-1")
    assert request_stop(lifecycle, request_id="r-1").status_before == "starting"
    assert started.result(timeout=30) == "r-1"
    r = row(lifecycle.db, "r-1")
    assert (r.status, r.end_reason) == ("ended", "USER_CLOSED")
    (vendor,) = simulator.sessions()
    assert (vendor["status"], vendor["end_reason"]) == ("ended", "USER_CLOSED")
    kinds = event_kinds(lifecycle.db, "r-1")
    assert kinds[-3:] == ["active", "stop_requested", "ended"], kinds


def test_reaper_ends_expired_sessions_at_the_vendor(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    start(lifecycle, claim_id="t-1", request_id="expired")
    start(lifecycle, claim_id="t-2", request_id="still-running")
    with lifecycle.db.transaction() as session:
        session.execute(
            update(SessionRow)
            .where(SessionRow.request_id == "expired")
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    report = reap(lifecycle)
    assert (report.claimed, report.stopped) == (1, 1)
    expired, running = row(lifecycle.db, "expired"), row(lifecycle.db, "still-running")
    assert (expired.status, expired.end_reason) == ("ended", "MAX_DURATION_REACHED")
    assert running.status == "active"
    by_id = {s["session_id"]: s for s in simulator.sessions()}
    assert by_id[expired.vendor_session_id]["end_reason"] == "MAX_DURATION_REACHED"
    assert by_id[running.vendor_session_id]["status"] == "active"
    assert reap(lifecycle).claimed == 0


def test_a_session_expiring_before_the_next_sweep_is_ended_at_its_expiry(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    """Beat's sweep plans a timed sweep for what expires before the next one (interval 30 s
    here): the session ends ~at its expiry, not up to a whole interval later."""
    start(lifecycle, request_id="soon")
    start(lifecycle, request_id="later")
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    with lifecycle.db.transaction() as session:
        session.execute(
            update(SessionRow).where(SessionRow.request_id == "soon").values(expires_at=expires)
        )
    assert reap(lifecycle, plan_ahead=30.0).claimed == 0
    soon = wait_until(
        lambda: (r := row(lifecycle.db, "soon")).status == "ended" and r, timeout=10, interval=0.05
    )
    assert soon.end_reason == "MAX_DURATION_REACHED"
    assert soon.ended_at is not None
    lag = (soon.ended_at - expires).total_seconds()
    assert 0 <= lag < 1.0, lag
    assert row(lifecycle.db, "later").status == "active"  # expires in an hour: no timer


def test_failed_vendor_stop_stays_stopping_and_the_reaper_retries(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    start(lifecycle, request_id="r-1")
    simulator.push_fault({"endpoint": "stop", "status": 500, "code": 5000, "count": 10})
    request_stop(lifecycle, request_id="r-1")
    r = row(lifecycle.db, "r-1")
    assert (r.status, r.stop_attempts) == ("stopping", 1)
    assert "failed" not in r.status
    simulator.reset()  # the vendor recovers (this also forgets its sessions' stop counts)
    with lifecycle.db.transaction() as session:
        session.execute(
            update(SessionRow).values(stop_retry_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert reap(lifecycle).claimed == 1
    r = row(lifecycle.db, "r-1")
    assert (r.status, r.end_reason) == ("ended", "USER_CLOSED")


def test_vendor_session_is_stopped_again_if_the_row_moved_on_during_the_start(
    lifecycle: Lifecycle, simulator: SimulatorServer
) -> None:
    """Compensation: the vendor said yes, but the row can no longer take the session."""
    simulator.configure(endpoint_latency="start=1.0")
    started = start_with_the_vendor_call_in_flight(lifecycle, "r-1")
    # The attempt's lease runs out meanwhile (as after a long vendor hang), and the reconciler
    # gives up on it.
    with lifecycle.db.transaction() as session:
        session.execute(
            update(SessionRow).values(attempt_lease_until=datetime.now(UTC) - timedelta(minutes=1))
        )
    stuck = store.resolve_stuck_starts(
        lifecycle.db, start_timeout=lifecycle.settings.start_timeout_seconds
    )
    assert stuck.failed == ["r-1"]
    assert started.result(timeout=30) == "r-1"
    r = row(lifecycle.db, "r-1")
    assert (r.status, r.error_code, r.vendor_session_id) == ("failed", "START_TIMEOUT", None)
    (vendor,) = simulator.sessions()
    assert (vendor["status"], vendor["end_reason"]) == ("ended", "ERROR")
    assert events(lifecycle.db, "compensated")[0]["vendor_session_id"] == vendor["session_id"]


def test_a_lifecycle_refuses_a_database_whose_commits_tell_nobody(lifecycle: Lifecycle) -> None:
    """Without commit hooks a freed slot would wait for beat's backstop instead of the next
    request: the constructor says so rather than running slower in silence."""
    from orchestrator.db import Database

    bare = Database(lifecycle.db.url)
    try:
        with pytest.raises(ValueError, match="hooks=DispatchAfterCommit"):
            Lifecycle(
                settings=lifecycle.settings,
                db=bare,
                vendor=lifecycle.vendor,
                dispatcher=lifecycle.dispatcher,
            )
    finally:
        bare.engine.dispose()
