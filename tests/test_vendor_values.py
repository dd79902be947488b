"""Vendor values are untrusted input: hostile numbers, times and texts in the vendor's replies
(respx at the HTTP boundary, real Postgres). Each is parsed or skipped and logged with its
row's id; no reply ends a reconcile pass or escapes a start after the vendor made a session;
what is stored fits its column. Also: a grant never lengthens a session, a blank end reason is
not an end, and the database's clock times events."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx
from sqlalchemy import text

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.deepbrain import DeepBrainError
from orchestrator.deepbrain.models import parse_started_session, parse_vendor_session
from orchestrator.lifecycle import Lifecycle, handle_start_message, reconcile
from orchestrator.lifecycle.inline import inline_lifecycle
from tests.helpers import events, insert_live_row, row

pytestmark = pytest.mark.postgres

BASE = "http://vendor.test"
LIST_URL = f"{BASE}/api/v2/sessions"
START_URL = f"{BASE}/api/v2/sessions/start"
STOP_URL = f"{BASE}/api/v2/sessions/stop"
TOKEN_URL = f"{BASE}/api/v2/sessions/token"
MS_EPOCH = 1764600000000
HUGE = int("9" * 400)


def envelope(data: Any) -> dict[str, Any]:
    return {"code": 1000, "message": "ok", "data": data}


def old(seconds: float = 600) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


@pytest.fixture
def lc(settings_for: Callable[..., Settings], db: Database) -> Iterator[Lifecycle]:
    lifecycle = inline_lifecycle(
        settings_for(deepbrain_base_url=BASE, orphan_grace_seconds=5.0, vendor_timeout_seconds=2)
    )
    yield lifecycle
    lifecycle.close()


def list_reply(*rows: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json=envelope({"results": list(rows), "next": None}))


def raw_list_reply(rows_json: str) -> httpx.Response:
    """A list page written by hand: JSON that Python's own encoder would not produce."""
    body = '{"code": 1000, "message": "ok", "data": {"next": null, "results": [' + rows_json + "]}}"
    return httpx.Response(200, content=body.encode(), headers={"content-type": "application/json"})


def stopped_ids(stop: respx.Route) -> list[str]:
    return [json.loads(call.request.content)["session_id"] for call in stop.calls]


# -- path 1: hostile values in the list ------------------------------------------------------


HOSTILE_ROWS = (
    '{"sessionId": "ms-epoch", "created_at": 1764600000000},'
    '{"sessionId": "infinite", "created_at": Infinity, "duration": -Infinity},'
    '{"sessionId": "nan", "created_at": NaN, "credits_consumed": NaN},'
    '{"sessionId": "far-past", "created_at": -1e18},'
    f'{{"sessionId": "huge-int", "created_at": {HUGE}, "duration": {HUGE}}},'
    '{"sessionId": "odd-types", "created_at": [1], "updated_at": {"a": 1}, "source": {"x": 1},'
    ' "end_reason": 12, "duration": "1e999"},'
    '{"sessionId": "nul", "created_at": "2020-01-01T00:00:00\\u0000", "source": "a\\u0000b"}'
)


def test_hostile_values_in_the_vendor_list_are_skipped_and_the_pass_goes_on(
    lc: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    """ms epochs, non-finite and 400-digit numbers, odd types: the pass still ends the row the
    vendor ended and stops every orphan it can age."""
    insert_live_row(lc.db, "gone", "vendor-gone")
    caplog.set_level(logging.WARNING)
    with respx.mock(assert_all_called=False) as vendor:
        vendor.get(LIST_URL).mock(return_value=raw_list_reply(HOSTILE_ROWS))
        vendor.get(f"{LIST_URL}/vendor-gone").respond(
            json=envelope({"sessionId": "vendor-gone", "end_at": old(5), "end_reason": "ERROR"})
        )
        stop = vendor.post(STOP_URL).respond(json=envelope(None))
        report = reconcile(lc)
    assert not report.vendor_error, caplog.text
    assert report.vendor_ended == 1
    assert row(lc.db, "gone").status == "ended"
    # The ms epoch is a time long past: that orphan is stopped at once. The others are aged
    # from their first sighting (below).
    assert "ms-epoch" in stopped_ids(stop)
    assert "nul" in stopped_ids(stop)  # its time and source parse once the NUL is gone
    assert report.skipped_values >= 8
    for vendor_id in ("infinite", "nan", "far-past", "huge-int", "odd-types"):
        assert f"session {vendor_id}:" in caplog.text  # each skip is logged with its row's id


def test_an_orphan_the_vendor_gives_no_usable_time_is_stopped_after_the_grace(
    lc: Lifecycle,
) -> None:
    """A missing or unparseable ``created_at`` is timed from the database's first sighting."""
    rows = (
        {"sessionId": "no-time"},
        {"sessionId": "bad-time", "created_at": "yesterday-ish"},
        {"sessionId": "future", "created_at": (datetime.now(UTC) + timedelta(days=3)).isoformat()},
    )
    with respx.mock(assert_all_called=False) as vendor:
        vendor.get(LIST_URL).mock(return_value=list_reply(*rows))
        stop = vendor.post(STOP_URL).respond(json=envelope(None))
        assert reconcile(lc).orphans_stopped == 0  # first sighting: young
        with lc.db.transaction() as session:  # the grace (5 s) passes, by the database's clock
            session.execute(
                text(
                    "UPDATE session_events SET occurred_at = now() - interval '1 minute'"
                    " WHERE kind = 'vendor_session_seen'"
                )
            )
        with lc.db.transaction() as session:
            session.execute(text("UPDATE sweep_leases SET finished_at = NULL"))
        report = reconcile(lc)
    assert sorted(stopped_ids(stop)) == ["bad-time", "future", "no-time"]
    assert report.orphans_stopped == 3
    seen = events(lc.db, "vendor_session_seen")
    assert sorted(e["vendor_session_id"] for e in seen) == ["bad-time", "future", "no-time"]


def test_a_detail_reply_with_a_long_or_nul_end_reason_or_a_far_end_time_ends_the_row_sanely(
    lc: Lifecycle,
) -> None:
    insert_live_row(lc.db, "long", "vendor-long")
    insert_live_row(lc.db, "nul", "vendor-nul")
    insert_live_row(lc.db, "future", "vendor-future")
    with respx.mock(assert_all_called=False) as vendor:
        vendor.get(LIST_URL).mock(return_value=list_reply())
        vendor.get(f"{LIST_URL}/vendor-long").respond(
            json=envelope({"sessionId": "vendor-long", "end_at": old(5), "end_reason": "X" * 500})
        )
        vendor.get(f"{LIST_URL}/vendor-nul").respond(
            json=envelope({"sessionId": "vendor-nul", "end_at": old(5), "end_reason": "IDLE\x00"})
        )
        vendor.get(f"{LIST_URL}/vendor-future").respond(
            json=envelope({"sessionId": "vendor-future", "end_at": "9999-12-31T00:00:00Z"})
        )
        report = reconcile(lc)
    assert report.vendor_ended == 3
    assert row(lc.db, "long").end_reason == "X" * 64
    assert row(lc.db, "nul").end_reason == "IDLE"
    ended_at = row(lc.db, "future").ended_at
    assert ended_at is not None and ended_at <= datetime.now(UTC)  # not the vendor's year 9999


def test_an_empty_end_reason_on_a_running_session_does_not_end_it(lc: Lifecycle) -> None:
    insert_live_row(lc.db, "running", "vendor-running")
    with respx.mock(assert_all_called=False) as vendor:
        # A stale list without it, then a detail that says it runs ("" and no end time).
        vendor.get(LIST_URL).mock(return_value=list_reply())
        vendor.get(f"{LIST_URL}/vendor-running").respond(
            json=envelope({"sessionId": "vendor-running", "end_at": None, "end_reason": ""})
        )
        stop = vendor.post(STOP_URL).respond(json=envelope(None))
        report = reconcile(lc)
    assert report.vendor_ended == 0
    assert row(lc.db, "running").status == "active"
    assert stop.call_count == 0


def test_a_pass_that_finds_many_orphans_warns_naming_the_count(
    settings_for: Callable[..., Settings], db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    lifecycle = inline_lifecycle(settings_for(deepbrain_base_url=BASE))
    rows = [{"sessionId": f"other-{i}", "created_at": old()} for i in range(12)]
    caplog.set_level(logging.WARNING)
    try:
        with respx.mock(assert_all_called=False) as vendor:
            vendor.get(LIST_URL).mock(return_value=list_reply(*rows))
            vendor.post(STOP_URL).respond(json=envelope(None))
            reconcile(lifecycle)
    finally:
        lifecycle.close()
    warnings = [r.getMessage() for r in caplog.records if "another deployment" in r.getMessage()]
    assert len(warnings) == 1 and "12" in warnings[0], caplog.text


# -- path 1: hostile values in a start reply -------------------------------------------------


def start_route(vendor: respx.MockRouter, data: Any) -> respx.Route:
    vendor.post(TOKEN_URL).respond(json=envelope({"session_token": "tok"}))
    body = json.dumps(envelope(data)).encode()  # Infinity and NaN as Python writes them
    return vendor.post(START_URL).respond(
        content=body, headers={"content-type": "application/json"}
    )


LIVEKIT = {"url": "wss://lk.test", "room_name": "room-1", "token": "lk-token"}


def unsigned_jwt(claims_json: str) -> str:
    """A JWT-shaped token whose claims are the JSON given as is (the vendor's to write)."""

    def part(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    return ".".join([part('{"alg": "HS256", "typ": "JWT"}'), part(claims_json), "c2ln"])


def start_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "session_id": "vendor-1",
        "max_session_duration": 20,
        "max_session_numbers": 10,
        "livekit": LIVEKIT,
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "changes",
    [
        {"max_session_numbers": HUGE},
        {"max_session_numbers": 2**40},
        {"max_session_numbers": -5},
        {"max_session_duration": HUGE},
        {"max_session_duration": 2**40},
        {"max_session_duration": math.inf},
        {"voice_id": "v\x00oice"},
        {"voice_id": {"not": "a string"}},
        {"livekit": {**LIVEKIT, "token": unsigned_jwt('{"exp": 1e18}')}},
        {"livekit": {**LIVEKIT, "token": unsigned_jwt('{"exp": Infinity}')}},
        {"livekit": {**LIVEKIT, "token": unsigned_jwt('{"exp": ' + "9" * 400 + "}")}},
    ],
    ids=[
        "numbers-400-digits",
        "numbers-2^40",
        "numbers-negative",
        "minutes-400-digits",
        "minutes-2^40",
        "minutes-inf",
        "voice-nul",
        "voice-object",
        "livekit-exp-1e18",
        "livekit-exp-inf",
        "livekit-exp-400-digits",
    ],
)
def test_a_bad_value_in_a_start_reply_is_skipped_and_the_session_recorded(
    lc: Lifecycle, changes: dict[str, Any]
) -> None:
    with respx.mock(assert_all_called=False) as vendor:
        start_route(vendor, start_data(**changes))
        stop = vendor.post(STOP_URL).respond(json=envelope(None))
        outcome = handle_start_message(
            lc, (), {"avatar_id": "a", "request_id": "r-1"}, claim_id="t-1"
        )
    assert outcome.status == "active", outcome
    r = row(lc.db, "r-1")
    assert (r.status, r.vendor_session_id) == ("active", "vendor-1")
    assert stop.call_count == 0
    assert r.voice_id in (None, "voice")
    if "max_session_numbers" in changes:  # a limit we cannot believe is no limit
        assert r.max_session_numbers is None
    if "max_session_duration" in changes:
        assert r.granted_max_duration_minutes is None


@pytest.mark.parametrize(
    "session_id", ["v" * 300, "bad\x00id"], ids=["id-longer-than-the-column", "id-with-nul"]
)
def test_a_start_reply_whose_session_cannot_be_recorded_is_stopped_at_once(
    lc: Lifecycle, session_id: str
) -> None:
    with respx.mock(assert_all_called=False) as vendor:
        start_route(vendor, start_data(session_id=session_id))
        stop = vendor.post(STOP_URL).respond(json=envelope(None))
        outcome = handle_start_message(
            lc, (), {"avatar_id": "a", "request_id": "r-1"}, claim_id="t-1"
        )
    assert outcome.status == "failed", outcome
    assert stopped_ids(stop) == [session_id]
    assert row(lc.db, "r-1").error_code == "VENDOR_BAD_REPLY"


# -- path 3: a grant never lengthens a session -----------------------------------------------


@pytest.mark.parametrize(
    ("ask", "granted", "plan", "expected_seconds"),
    [
        ({"max_session_duration": 1}, 20, 60, 60),
        ({"max_duration_seconds": 90}, 20, 60, 90),
        ({}, 20, 5, 300),
        ({"max_session_duration": 30}, 10, 60, 600),
        ({}, None, 7, 420),
    ],
    ids=["asked-1-granted-20", "asked-90s", "default-plan-5", "granted-less", "no-grant"],
)
def test_a_session_ends_at_the_earliest_of_the_ask_the_grant_and_the_plan(
    settings_for: Callable[..., Settings],
    db: Database,
    ask: dict[str, Any],
    granted: int | None,
    plan: int,
    expected_seconds: float,
) -> None:
    lifecycle = inline_lifecycle(settings_for(deepbrain_base_url=BASE, max_session_minutes=plan))
    try:
        with respx.mock(assert_all_called=False) as vendor:
            start_route(vendor, start_data(max_session_duration=granted))
            handle_start_message(
                lifecycle, (), {"avatar_id": "a", "request_id": "r-1", **ask}, claim_id="t-1"
            )
    finally:
        lifecycle.close()
    r = row(db, "r-1")
    assert r.status == "active" and r.expires_at is not None and r.start_sent_at is not None
    assert (r.expires_at - r.start_sent_at).total_seconds() == expected_seconds


# -- the parsers are total -------------------------------------------------------------------

ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    MS_EPOCH,
    HUGE,
    -HUGE,
    2**63,
    1e308,
    -1e18,
    math.inf,
    -math.inf,
    math.nan,
    "",
    " ",
    "\x00",
    "\ud800",
    "x" * 10_000,
    "1e999",
    "²",
    "-1",
    "2026-13-45",
    "9" * 400,
    [],
    [1],
    {},
    {"a": {"b": None}},
    1.5,
]


@pytest.mark.parametrize("value", ODD_VALUES, ids=[repr(v)[:20] for v in ODD_VALUES])
def test_any_json_value_in_any_field_parses_or_is_a_typed_skip(value: Any) -> None:
    """Any value in any field: a usable value (tz-aware time, finite number, text without NUL,
    an integer in range) or None, never an exception but a DeepBrainError for a missing id."""
    for name in ("created_at", "updated_at", "end_at"):
        got = parse_vendor_session({"sessionId": "s", name: value}, "GET /x")
        when = getattr(got, name)
        assert when is None or when.tzinfo is not None
    for name in ("duration", "credits_consumed"):
        number = getattr(parse_vendor_session({"sessionId": "s", name: value}, "GET /x"), name)
        assert number is None or math.isfinite(number)
    for name in ("source", "end_reason"):
        words = getattr(parse_vendor_session({"sessionId": "s", name: value}, "GET /x"), name)
        assert words is None or (words.strip() and "\x00" not in words)
    for name in ("voice_id", "max_session_duration", "max_session_numbers"):
        started = parse_started_session({**start_data(), name: value}, "POST /x")
        assert started.session_id == "vendor-1"
        for limit in (started.max_session_duration, started.max_session_numbers):
            assert limit is None or 0 <= limit < 2**31
    for data in (value, {"session_id": value}, {**start_data(), "livekit": value}):
        with contextlib.suppress(DeepBrainError):
            parse_started_session(data, "POST /x")
    with contextlib.suppress(DeepBrainError):
        parse_vendor_session({"sessionId": value}, "GET /x")


def test_a_start_reply_reusing_another_requests_session_id_stops_nothing_of_theirs(
    lc: Lifecycle,
) -> None:
    with respx.mock(assert_all_called=False) as vendor:
        start_route(vendor, start_data(session_id="vendor-1"))
        stop = vendor.post(STOP_URL).respond(json=envelope(None))
        handle_start_message(lc, (), {"avatar_id": "a", "request_id": "first"}, claim_id="t-1")
        outcome = handle_start_message(
            lc, (), {"avatar_id": "a", "request_id": "second"}, claim_id="t-2"
        )
    assert row(lc.db, "first").status == "active"
    assert stop.call_count == 0  # the first request's session keeps running
    assert outcome.status == "failed"
