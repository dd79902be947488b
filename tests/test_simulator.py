"""The DeepBrain simulator, exercised with plain httpx (never the orchestrator's client)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import jwt
import pytest
from livekit import api as livekit_api

from orchestrator.simulator import (
    SimulatorConfig,
    SimulatorServer,
    create_app,
    parse_endpoint_values,
)

APP_ID = "demo-app-id"
USER_KEY = "demo-user-key"
KEY = {"STUDIO-API-KEY": USER_KEY}
ENVELOPE_KEYS = {"code", "data", "message"}
ROW_KEYS = {"sessionId", "created_at", "updated_at", "duration", "source", "credits_consumed"}


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(seed=1)) as server:
        yield server


@pytest.fixture
def client(sim: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, timeout=5.0) as c:
        yield c


def get_token(client: httpx.Client) -> str:
    r = client.post("/api/v2/sessions/token", json={"appId": APP_ID, "userKey": USER_KEY})
    assert r.status_code == 200, r.text
    token = r.json()["data"]["session_token"]
    assert isinstance(token, str)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start(client: httpx.Client, token: str, **body: Any) -> httpx.Response:
    body.setdefault("avatar_id", "avatar-1")
    return client.post("/api/v2/sessions/start", json=body, headers=bearer(token))


def start_ok(client: httpx.Client, token: str, **body: Any) -> dict[str, Any]:
    r = start(client, token, **body)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def assert_error(r: httpx.Response, status: int, code: int, *, contains: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == ENVELOPE_KEYS
    assert body["code"] == code
    assert body["data"] is None
    assert contains in body["message"]


def detail(client: httpx.Client, session_id: str) -> dict[str, Any]:
    r = client.get(f"/api/v2/sessions/{session_id}", headers=KEY)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


# -- token and start -------------------------------------------------------------------


def test_token_and_start_mint_real_jwts(sim: SimulatorServer, client: httpx.Client) -> None:
    token = get_token(client)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert abs(claims["exp"] - (time.time() + 3600)) < 5

    body = {
        "avatar_id": "avatar-7",
        "avatar_persona": {
            "language": "en-US",
            "llm_configurations": {
                "provider": "openai",
                "model": "gpt-4o",
                "temperature": 0.2,
                "custom_settings": {"greeting_text": "hi", "system_prompt": "be nice"},
            },
        },
        "max_session_duration": 5,
        "greeting_text": "hello",
    }
    r = client.post("/api/v2/sessions/start", json=body, headers=bearer(token))
    assert r.status_code == 200
    payload = r.json()
    assert set(payload) == ENVELOPE_KEYS
    assert payload["code"] == 1000
    assert payload["message"] == "Session has been started"
    data = payload["data"]
    assert set(data) == {
        "session_id",
        "voice_id",
        "max_session_duration",
        "max_session_numbers",
        "livekit",
    }
    assert data["max_session_duration"] == 5
    assert data["max_session_numbers"] == 10
    livekit = data["livekit"]
    assert livekit["url"] == "wss://livekit.simulator.invalid"

    cfg = sim.config
    verified = livekit_api.TokenVerifier(cfg.livekit_api_key, cfg.livekit_api_secret).verify(
        livekit["token"]
    )
    assert verified.video is not None
    assert verified.video.room == livekit["room_name"]
    assert verified.video.room_join
    assert verified.identity
    lk_claims = jwt.decode(
        livekit["token"], cfg.livekit_api_secret, algorithms=["HS256"], issuer=cfg.livekit_api_key
    )
    assert lk_claims["sub"] == verified.identity
    # granted 5 minutes + the 300 s margin
    assert abs(lk_claims["exp"] - (time.time() + 5 * 60 + 300)) < 5

    [session] = sim.sessions()
    assert session["session_id"] == data["session_id"]
    assert session["status"] == "active"
    assert session["request_body"] == body
    assert session["unexpected_fields"] == []
    assert session["granted_minutes"] == 5
    assert session["livekit_room"] == livekit["room_name"]
    assert session["request_content_type"] == "application/json"


def test_start_records_undocumented_fields(sim: SimulatorServer, client: httpx.Client) -> None:
    start_ok(client, get_token(client), metadata={"x": 1}, request_id="r1")
    [session] = sim.sessions()
    assert session["unexpected_fields"] == ["metadata", "request_id"]


def test_start_duration_defaults_and_plan_limit(sim: SimulatorServer, client: httpx.Client) -> None:
    token = get_token(client)
    assert start_ok(client, token)["max_session_duration"] == 20
    assert start_ok(client, token, max_session_duration=60)["max_session_duration"] == 60
    assert_error(
        start(client, token, max_session_duration=61), 400, 4000, contains="max_session_duration"
    )
    sim.configure(plan_max_minutes=30, default_duration_minutes=45, start_http_status=201)
    r = start(client, token)
    assert r.status_code == 201
    assert r.json()["data"]["max_session_duration"] == 30


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "avatar_id"),
        ({"avatar_id": ""}, "avatar_id"),
        ({"avatar_id": 5}, "avatar_id"),
        ({"avatar_id": "a", "max_session_duration": 0}, "max_session_duration"),
        ({"avatar_id": "a", "max_session_duration": "5"}, "max_session_duration"),
        ({"avatar_id": "a", "max_session_duration": True}, "max_session_duration"),
        ({"avatar_id": "a", "max_session_duration": 1.5}, "max_session_duration"),
        ({"avatar_id": "a", "avatar_persona": "x"}, "avatar_persona"),
        ({"avatar_id": "a", "greeting_text": 3}, "greeting_text"),
        (
            {"avatar_id": "a", "avatar_persona": {"llm_configurations": {"temperature": "hot"}}},
            "temperature",
        ),
    ],
)
def test_start_validation(
    sim: SimulatorServer, client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    r = client.post("/api/v2/sessions/start", json=body, headers=bearer(get_token(client)))
    assert_error(r, 400, 4000, contains=field)
    assert sim.sessions() == []


def test_start_rejects_non_object_bodies(client: httpx.Client) -> None:
    headers = bearer(get_token(client))
    assert_error(client.post("/api/v2/sessions/start", json=[1], headers=headers), 400, 4000)
    r = client.post("/api/v2/sessions/start", content=b"{not json", headers=headers)
    assert_error(r, 400, 4000, contains="JSON")


# -- envelope and auth -----------------------------------------------------------------


def test_every_endpoint_answers_the_envelope(client: httpx.Client) -> None:
    token = get_token(client)
    sid = start_ok(client, token)["session_id"]
    replies = [
        client.post("/api/v2/sessions/token", json={"appId": APP_ID, "userKey": USER_KEY}),
        client.post(f"/api/v2/sessions/{sid}/ping", headers=bearer(token)),
        client.post(
            f"/api/v2/sessions/{sid}/talk",
            json={"message": "hi", "type": "text"},
            headers=bearer(token),
        ),
        client.get("/api/v2/sessions", params={"type": "active"}, headers=KEY),
        client.get(f"/api/v2/sessions/{sid}", headers=KEY),
        client.post(
            "/api/v2/sessions/stop", json={"session_id": sid, "reason": "USER_CLOSED"}, headers=KEY
        ),
    ]
    for r in replies:
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == ENVELOPE_KEYS, r.url
        assert body["code"] == 1000
        assert isinstance(body["message"], str)
    assert replies[-1].json()["message"] == "Session has been stopped"
    # unknown paths and methods also answer the envelope
    assert_error(client.get("/api/v2/nothing"), 404, 4040)
    assert_error(client.delete("/api/v2/sessions/stop"), 405, 4000)


def test_token_rejects_wrong_credentials(client: httpx.Client) -> None:
    url = "/api/v2/sessions/token"
    assert_error(client.post(url, json={"appId": APP_ID, "userKey": "nope"}), 401, 4010)
    assert_error(client.post(url, json={"appId": "nope", "userKey": USER_KEY}), 401, 4010)
    assert_error(client.post(url, json={"appId": APP_ID}), 400, 4000, contains="userKey")


def test_bearer_endpoints_reject_bad_tokens(sim: SimulatorServer, client: httpx.Client) -> None:
    sid = start_ok(client, get_token(client))["session_id"]
    forged = jwt.encode(
        {"iss": "deepbrain-simulator", "sub": APP_ID, "exp": int(time.time()) + 60, "gen": 0},
        "another-secret-that-is-long-enough-for-hs256",
        algorithm="HS256",
    )
    sim.configure(token_ttl_seconds=0)
    expired = get_token(client)
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": f"Basic {forged}"},
        bearer(forged),
        bearer(expired),
        KEY,  # the userKey is not a session token
    ]
    for headers in bad_headers:
        for r in (
            client.post("/api/v2/sessions/start", json={"avatar_id": "a"}, headers=headers),
            client.post(f"/api/v2/sessions/{sid}/ping", headers=headers),
            client.post(f"/api/v2/sessions/{sid}/talk", json={"message": "x"}, headers=headers),
        ):
            assert_error(r, 401, 4010)
    assert len(sim.sessions()) == 1


def test_api_key_endpoints_reject_bad_keys(client: httpx.Client) -> None:
    token = get_token(client)
    sid = start_ok(client, token)["session_id"]
    for headers in ({}, {"STUDIO-API-KEY": "wrong"}, bearer(token)):
        assert_error(
            client.post("/api/v2/sessions/stop", json={"session_id": sid}, headers=headers),
            401,
            4010,
        )
        assert_error(client.get("/api/v2/sessions", headers=headers), 401, 4010)
        assert_error(client.get(f"/api/v2/sessions/{sid}", headers=headers), 401, 4010)
    # header names are case-insensitive
    r = client.get(f"/api/v2/sessions/{sid}", headers={"studio-api-key": USER_KEY})
    assert r.status_code == 200


def test_revoke_tokens(client: httpx.Client) -> None:
    old = get_token(client)
    start_ok(client, old)
    assert client.post("/_sim/revoke_tokens").status_code == 200
    assert_error(start(client, old), 401, 4010)
    start_ok(client, get_token(client))


# -- limits, stop, talk -------------------------------------------------------------------


def test_concurrency_limit(sim: SimulatorServer, client: httpx.Client) -> None:
    sim.configure(max_concurrent_sessions=2)
    token = get_token(client)
    first = start_ok(client, token)
    assert first["max_session_numbers"] == 2
    start_ok(client, token)
    assert_error(start(client, token), 403, 4030, contains="concurrent session limit reached")
    client.post("/api/v2/sessions/stop", json={"session_id": first["session_id"]}, headers=KEY)
    start_ok(client, token)
    sim.configure(limit_status=429, limit_code=4290, limit_message="slow down")
    assert_error(start(client, token), 429, 4290, contains="slow down")
    assert sim.stats()["sessions"]["max_active"] == 2


def test_stop_unknown_conflict_and_counts(sim: SimulatorServer, client: httpx.Client) -> None:
    sid = start_ok(client, get_token(client))["session_id"]
    stop = "/api/v2/sessions/stop"
    assert_error(
        client.post(stop, json={"session_id": "nope", "reason": "USER_CLOSED"}, headers=KEY),
        404,
        4040,
    )
    assert_error(
        client.post(stop, json={"reason": "USER_CLOSED"}, headers=KEY),
        400,
        4000,
        contains="session_id",
    )
    r = client.post(stop, json={"session_id": sid, "reason": "ZOMBIE_SESSION_REAP"}, headers=KEY)
    assert r.status_code == 200
    assert r.json()["code"] == 1000
    assert_error(
        client.post(stop, json={"session_id": sid, "reason": "USER_CLOSED"}, headers=KEY), 409, 4090
    )

    [session] = sim.sessions()
    assert session["status"] == "ended"
    assert session["end_reason"] == "ZOMBIE_SESSION_REAP"
    assert session["ended_by"] == "stop"
    assert session["ended_at"] is not None
    assert session["stop_calls"] == 2
    assert [s["status"] for s in session["stop_requests"]] == [200, 409]
    stats = sim.stats()
    assert stats["stop_calls_unknown"] == {"nope": 1}
    assert stats["endpoints"]["stop"]["statuses"] == {"404": 1, "400": 1, "200": 1, "409": 1}


def test_talk(sim: SimulatorServer, client: httpx.Client) -> None:
    token = get_token(client)
    sid = start_ok(client, token)["session_id"]
    url = f"/api/v2/sessions/{sid}/talk"
    assert client.post(url, json={"message": "hello"}, headers=bearer(token)).status_code == 200
    assert_error(
        client.post(url, json={"type": "text"}, headers=bearer(token)),
        400,
        4000,
        contains="message",
    )
    assert_error(
        client.post("/api/v2/sessions/nope/talk", json={"message": "x"}, headers=bearer(token)),
        404,
        4040,
    )
    assert sim.sessions()[0]["talks"] == 1


# -- list and detail --------------------------------------------------------------------------


def test_list_pagination_over_100_sessions(sim: SimulatorServer, client: httpx.Client) -> None:
    sim.configure(max_concurrent_sessions=500)
    token = get_token(client)
    ids = [start_ok(client, token)["session_id"] for _ in range(105)]
    for sid in ids[:5]:
        client.post(
            "/api/v2/sessions/stop", json={"session_id": sid, "reason": "USER_CLOSED"}, headers=KEY
        )

    r = client.get("/api/v2/sessions", params={"page": 1, "page_size": 100}, headers=KEY)
    page1 = r.json()["data"]
    assert page1["count"] == 105
    assert len(page1["results"]) == 100
    assert page1["previous"] is None
    assert page1["next"].startswith(sim.base_url)
    assert "page=2" in page1["next"]
    assert page1["results"][0]["sessionId"] == ids[-1]  # newest first

    page2 = client.get(page1["next"], headers=KEY).json()["data"]
    assert len(page2["results"]) == 5
    assert page2["next"] is None
    assert "page=1" in page2["previous"]
    seen = [row["sessionId"] for row in page1["results"] + page2["results"]]
    assert sorted(seen) == sorted(ids)

    for row in page1["results"]:
        assert set(row) == ROW_KEYS
        assert datetime.fromisoformat(row["created_at"]).tzinfo is not None
        assert datetime.fromisoformat(row["updated_at"]).tzinfo is not None
        assert isinstance(row["duration"], int)
        assert row["source"] == "api"

    active = client.get(
        "/api/v2/sessions", params={"type": "active", "page_size": 100}, headers=KEY
    )
    assert active.json()["data"]["count"] == 100
    historic = client.get("/api/v2/sessions", params={"type": "historic"}, headers=KEY)
    assert historic.json()["data"]["count"] == 5
    assert {row["sessionId"] for row in historic.json()["data"]["results"]} == set(ids[:5])
    # default page size
    assert len(client.get("/api/v2/sessions", headers=KEY).json()["data"]["results"]) == 10

    for params in (
        {"page_size": 0},
        {"page_size": 101},
        {"page_size": "x"},
        {"page": 0},
        {"type": "all"},
    ):
        assert_error(client.get("/api/v2/sessions", params=params, headers=KEY), 400, 4000)
    # past the last page: empty, not an error
    empty = client.get("/api/v2/sessions", params={"page": 9, "page_size": 100}, headers=KEY)
    assert empty.json()["data"]["results"] == []


def test_detail(client: httpx.Client) -> None:
    sid = start_ok(client, get_token(client))["session_id"]
    row = detail(client, sid)
    assert set(row) == ROW_KEYS | {"end_at", "end_reason"}
    assert row["sessionId"] == sid
    assert row["end_at"] is None
    assert row["end_reason"] is None
    client.post("/api/v2/sessions/stop", json={"session_id": sid, "reason": "ERROR"}, headers=KEY)
    row = detail(client, sid)
    assert row["end_reason"] == "ERROR"
    assert datetime.fromisoformat(row["end_at"]) >= datetime.fromisoformat(row["created_at"])
    assert_error(client.get("/api/v2/sessions/unknown-id", headers=KEY), 404, 4040)


# -- sessions ending on their own ----------------------------------------------------------------


def test_ping_reports_idle_timeout(client: httpx.Client) -> None:
    token = get_token(client)
    sid = start_ok(client, token)["session_id"]
    r = client.post(f"/api/v2/sessions/{sid}/ping", headers=bearer(token))
    assert r.json()["data"] == {"idle_timeout_sec": 180, "next_ping_recommended_sec": 120}
    assert_error(client.post("/api/v2/sessions/nope/ping", headers=bearer(token)), 404, 4040)


def test_idle_timeout_ends_sessions(sim: SimulatorServer, client: httpx.Client) -> None:
    sim.configure(idle_timeout_seconds=0.3)
    token = get_token(client)
    sid = start_ok(client, token)["session_id"]
    time.sleep(0.15)
    ping = client.post(f"/api/v2/sessions/{sid}/ping", headers=bearer(token))
    assert ping.json()["data"]["idle_timeout_sec"] == 0.3
    time.sleep(0.2)  # 0.35 s after start, 0.2 s after the ping
    assert detail(client, sid)["end_reason"] is None
    time.sleep(0.25)
    row = detail(client, sid)
    assert row["end_reason"] == "IDLE_TIMEOUT"
    assert row["end_at"] is not None
    assert_error(client.post(f"/api/v2/sessions/{sid}/ping", headers=bearer(token)), 409, 4090)
    assert (
        client.get("/api/v2/sessions", params={"type": "active"}, headers=KEY).json()["data"][
            "count"
        ]
        == 0
    )
    [session] = sim.sessions()
    assert session["ended_by"] == "idle"
    assert session["pings"] == 1


def test_max_duration_ends_sessions_despite_pings(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    sim.configure(seconds_per_minute=0.3, idle_timeout_seconds=None)
    token = get_token(client)
    data = start_ok(client, token, max_session_duration=1)
    sid = data["session_id"]
    time.sleep(0.15)
    assert client.post(f"/api/v2/sessions/{sid}/ping", headers=bearer(token)).status_code == 200
    time.sleep(0.25)
    row = detail(client, sid)
    assert row["end_reason"] == "MAX_DURATION_REACHED"
    end = datetime.fromisoformat(row["end_at"]).timestamp()
    created = datetime.fromisoformat(row["created_at"]).timestamp()
    assert abs((end - created) - 0.3) < 0.01  # ended at the deadline, not when noticed
    assert_error(
        client.post(
            "/api/v2/sessions/stop", json={"session_id": sid, "reason": "USER_CLOSED"}, headers=KEY
        ),
        409,
        4090,
    )
    # a slot is free again
    assert start(client, token).status_code == 200


def test_admin_ends_session_vendor_side(sim: SimulatorServer, client: httpx.Client) -> None:
    sid = start_ok(client, get_token(client))["session_id"]
    r = client.post(f"/_sim/sessions/{sid}/end", json={"reason": "IDLE_TIMEOUT"})
    assert r.status_code == 200
    assert detail(client, sid)["end_reason"] == "IDLE_TIMEOUT"
    assert client.post(f"/_sim/sessions/{sid}/end", json={"reason": "X"}).status_code == 409
    assert client.post("/_sim/sessions/nope/end", json={}).status_code == 404
    assert sim.sessions()[0]["ended_by"] == "admin"


# -- faults ---------------------------------------------------------------------------------------


def test_scripted_429_with_retry_after(sim: SimulatorServer, client: httpx.Client) -> None:
    sim.push_fault(
        {"endpoint": "start", "status": 429, "code": 4290, "retry_after": "2", "count": 2}
    )
    token = get_token(client)
    for _ in range(2):
        r = start(client, token)
        assert_error(r, 429, 4290)
        assert r.headers["Retry-After"] == "2"
    assert start(client, token).status_code == 200
    stats = sim.stats()["endpoints"]["start"]
    assert stats["statuses"] == {"429": 2, "200": 1}
    assert stats["faults_applied"] == 2
    assert len(sim.sessions()) == 1


def test_scripted_errors_with_defaults_and_messages(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    token = get_token(client)
    sid = start_ok(client, token)["session_id"]
    sim.push_fault({"endpoint": "stop", "status": 500, "code": 5000})
    stop_body = {"session_id": sid, "reason": "USER_CLOSED"}
    assert_error(
        client.post("/api/v2/sessions/stop", json=stop_body, headers=KEY),
        500,
        5000,
        contains="SESSION_ROOM_NOT_FOUND",
    )
    assert sim.sessions()[0]["status"] == "active"  # a failed stop stopped nothing
    assert client.post("/api/v2/sessions/stop", json=stop_body, headers=KEY).status_code == 200
    assert sim.sessions()[0]["stop_calls"] == 2

    sim.push_fault({"endpoint": "start", "status": 402, "code": 4020, "message": "out of credits"})
    assert_error(start(client, token), 402, 4020, contains="out of credits")
    sim.push_fault({"endpoint": "token", "status": 503})
    assert_error(client.post("/api/v2/sessions/token", json={}), 503, 5000)
    sim.push_fault({"endpoint": "list", "status": 502, "raw_body": "<html>bad gateway</html>"})
    r = client.get("/api/v2/sessions", headers=KEY)
    assert r.status_code == 502
    assert r.text == "<html>bad gateway</html>"


def test_after_create_fault_leaves_a_session_behind(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    sim.push_fault({"endpoint": "start", "after_create": True})
    token = get_token(client)
    assert_error(start(client, token, avatar_id="uncertain"), 500, 5000)
    [session] = sim.sessions()
    assert session["status"] == "active"
    assert session["avatar_id"] == "uncertain"
    listed = client.get("/api/v2/sessions", params={"type": "active"}, headers=KEY).json()["data"]
    assert [row["sessionId"] for row in listed["results"]] == [session["session_id"]]

    sim.push_fault({"endpoint": "start", "after_create": True, "disconnect": True})
    with pytest.raises(httpx.RemoteProtocolError):
        start(client, token, avatar_id="dropped")
    assert [s["avatar_id"] for s in sim.sessions()] == ["uncertain", "dropped"]
    assert sim.stats()["endpoints"]["start"]["statuses"]["dropped"] == 1


def test_delay_fault_hangs_past_client_timeout(sim: SimulatorServer, client: httpx.Client) -> None:
    token = get_token(client)
    sim.push_fault({"endpoint": "start", "delay_seconds": 0.4})
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            "/api/v2/sessions/start", json={"avatar_id": "slow"}, headers=bearer(token), timeout=0.1
        )
    # the vendor went on and created it: the caller never learnt its id
    deadline = time.monotonic() + 2
    while not sim.sessions() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [s["avatar_id"] for s in sim.sessions()] == ["slow"]


def test_a_trickle_fault_sends_the_reply_a_few_bytes_at_a_time_and_may_reset_it(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    """Each read is quick (httpx's read timeout never fires), the whole reply slow; a reset
    cuts the body after the vendor acted (the session exists)."""
    token = get_token(client)
    sim.push_fault({"endpoint": "list", "trickle_bytes": 8, "trickle_interval_seconds": 0.05})
    began = time.monotonic()
    with client.stream("GET", "/api/v2/sessions", headers=KEY, timeout=0.5) as r:
        pieces = list(r.iter_raw())
    took = time.monotonic() - began
    body = b"".join(pieces)
    assert r.status_code == 200 and r.headers["content-length"] == str(len(body))
    assert len(pieces) > 3 and max(len(p) for p in pieces) <= 16  # pieces, not one reply
    assert took >= (len(body) // 8 - 1) * 0.05 * 0.9
    assert set(httpx.Response(200, content=body).json()) == ENVELOPE_KEYS

    sim.push_fault({"endpoint": "start", "reset_after_bytes": 20, "trickle_bytes": 4})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        start(client, token, avatar_id="cut")
    assert [s["avatar_id"] for s in sim.sessions()] == ["cut"]
    with pytest.raises(ValueError, match="trickle_bytes"):
        sim.push_fault({"endpoint": "list", "trickle_bytes": -1})
    with pytest.raises(ValueError, match="trickle_interval_seconds"):
        sim.push_fault({"endpoint": "list", "trickle_bytes": 1, "trickle_interval_seconds": -1})


def test_random_failures_are_reproducible_with_a_seed(
    client: httpx.Client, sim: SimulatorServer
) -> None:
    sim.configure(failure_rate={"detail": 1.0})
    assert_error(
        client.get("/api/v2/sessions/x", headers=KEY), 500, 5000, contains="SESSION_ROOM_NOT_FOUND"
    )

    def outcomes() -> list[int]:
        config = SimulatorConfig(seed=7, failure_rate=parse_endpoint_values("list=0.5"))
        with SimulatorServer(config) as other, httpx.Client(base_url=other.base_url) as c:
            return [c.get("/api/v2/sessions", headers=KEY).status_code for _ in range(20)]

    first = outcomes()
    assert first == outcomes()
    assert set(first) == {200, 500}


def test_faults_and_config_over_http(client: httpx.Client) -> None:
    r = client.post(
        "/_sim/faults",
        json=[{"endpoint": "ping", "status": 500}, {"endpoint": "stop", "status": 429, "count": 3}],
    )
    assert r.status_code == 200
    pending = {f["endpoint"]: f["remaining"] for f in client.get("/_sim/faults").json()}
    assert pending == {"ping": 1, "stop": 3}
    assert client.post("/_sim/faults", json={"endpoint": "nope", "status": 500}).status_code == 400
    assert client.post("/_sim/faults", json={"endpoint": "stop", "bogus": 1}).status_code == 400
    assert client.post("/_sim/faults", json={"endpoint": "stop"}).status_code == 400

    r = client.post(
        "/_sim/config",
        json={"latency_seconds": 0, "failure_rate": "start=0.5", "idle_timeout_seconds": None},
    )
    assert r.status_code == 200
    assert r.json()["failure_rate"] == {"start": 0.5}
    assert r.json()["idle_timeout_seconds"] is None
    assert "token_secret" not in client.get("/_sim/config").json()
    bad = client.post("/_sim/config", json={"no_such_knob": 1})
    assert bad.status_code == 400
    assert "no_such_knob" in bad.json()["error"]
    assert client.post("/_sim/config", json={"failure_rate": "start=2"}).status_code == 400
    assert client.post("/_sim/config", json={"max_concurrent_sessions": "many"}).status_code == 400


def test_admin_sessions_stats_and_reset(sim: SimulatorServer, client: httpx.Client) -> None:
    token = get_token(client)
    sid = start_ok(client, token)["session_id"]
    sessions = client.get("/_sim/sessions").json()
    assert [s["session_id"] for s in sessions] == [sid]
    assert client.get(f"/_sim/sessions/{sid}").json()["avatar_id"] == "avatar-1"
    assert client.get("/_sim/sessions", params={"status": "ended"}).json() == []
    stats = client.get("/_sim/stats").json()
    assert stats["endpoints"]["start"]["statuses"] == {"200": 1}
    assert stats["endpoints"]["token"]["calls"] == 1
    assert stats["sessions"]["active"] == 1
    sim.push_fault({"endpoint": "start", "status": 500})
    sim.configure(max_concurrent_sessions=3)
    assert client.post("/_sim/reset").status_code == 200
    assert sim.sessions() == []
    assert sim.stats()["endpoints"]["start"]["calls"] == 0
    assert sim.stats()["faults_pending"]["start"] == 0
    assert sim.config.max_concurrent_sessions == 3
    client.post("/_sim/reset", json={"config": True})
    assert sim.config.max_concurrent_sessions == 10


# -- latency, concurrency, lifecycle ------------------------------------------------------


def test_latency_knobs(sim: SimulatorServer, client: httpx.Client) -> None:
    """The global latency delays every endpoint but one overridden to 0. Bounds come from the
    configured delay (a sleep never ends early; a request that skipped it is far shorter), so
    only a knob that is ignored fails them, not a slow machine."""
    latency = 1.0
    sim.configure(latency_seconds=latency, endpoint_latency="list=0")
    t0 = time.perf_counter()
    get_token(client)
    assert time.perf_counter() - t0 >= latency
    t0 = time.perf_counter()
    client.get("/api/v2/sessions", headers=KEY)
    assert time.perf_counter() - t0 < latency  # the override: no 1 s delay for this one


def test_hundreds_of_concurrent_starts(sim: SimulatorServer, client: httpx.Client) -> None:
    """Starts are served side by side, not one after another: shown by how many the simulator
    held at once (a count, not a wall-clock bound; its speed is measured in benchmarks/)."""
    latency = 1.0
    sim.configure(endpoint_latency={"start": latency}, max_concurrent_sessions=300)
    headers = bearer(get_token(client))
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)

    def one(_: int) -> int:
        return pool.post(
            "/api/v2/sessions/start", json={"avatar_id": "a"}, headers=headers
        ).status_code

    with (
        httpx.Client(base_url=sim.base_url, limits=limits, timeout=30) as pool,
        ThreadPoolExecutor(200) as executor,
    ):
        statuses = list(executor.map(one, range(200)))
    assert statuses == [200] * 200
    # One at a time would hold at most 1; 50 at once needs only 50 of the 200 to arrive within
    # the 1 s each is held (a client thread per request).
    assert sim.stats()["endpoints"]["start"]["max_in_flight"] >= 50
    assert len(sim.sessions("active")) == 200


def test_stop_is_quick_with_a_request_in_flight() -> None:
    """Stop does not wait for a hung request: it returns, and the caller is disconnected,
    long before the request's delay would end (``stop`` itself raises after 5 s)."""
    hang = 30.0
    sim = SimulatorServer().start()
    sim.push_fault({"endpoint": "list", "delay_seconds": hang})
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.get(f"{sim.base_url}/api/v2/sessions", headers=KEY, timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 2
    while sim.stats()["endpoints"]["list"]["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.stats()["endpoints"]["list"]["in_flight"] == 1
    t0 = time.perf_counter()
    sim.stop()
    caller.join(hang / 3)
    assert not caller.is_alive()
    assert time.perf_counter() - t0 < hang / 3
    assert len(errors) == 1  # the hung caller is disconnected, not left hanging
    sim.stop()  # idempotent


def test_port_in_use_fails_at_start(sim: SimulatorServer) -> None:
    with pytest.raises(OSError):  # noqa: PT011 - errno differs by platform
        SimulatorServer(port=sim.port, host="127.0.0.1").start()


def test_logs_one_line_per_request_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.simulator")
    config = SimulatorConfig(app_id="app-SECRET-456", user_key="uk-SECRET-123")
    with SimulatorServer(config) as sim, httpx.Client(base_url=sim.base_url) as c:
        r = c.post(
            "/api/v2/sessions/token", json={"appId": config.app_id, "userKey": config.user_key}
        )
        token = r.json()["data"]["session_token"]
        data = c.post(
            "/api/v2/sessions/start", json={"avatar_id": "a"}, headers=bearer(token)
        ).json()["data"]
        c.post(
            "/api/v2/sessions/stop",
            json={"session_id": data["session_id"]},
            headers={"STUDIO-API-KEY": config.user_key},
        )
        c.get("/api/v2/sessions", headers={"STUDIO-API-KEY": "uk-WRONG"})
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "orchestrator.simulator"]
    assert len(lines) == 4
    assert re.fullmatch(r"POST /api/v2/sessions/token 200 [\d.]+ms", lines[0])
    assert lines[1].startswith("POST /api/v2/sessions/start 200 ")
    assert lines[3].startswith("GET /api/v2/sessions 401 ")
    for secret in ("SECRET", "WRONG", token, data["livekit"]["token"]):
        assert secret not in caplog.text


def test_config_parsing_helpers() -> None:
    assert parse_endpoint_values("start=0.1,stop=0.05") == {"start": 0.1, "stop": 0.05}
    assert parse_endpoint_values(("start=0.1", "stop=0.2")) == {"start": 0.1, "stop": 0.2}
    everything = parse_endpoint_values("*=0.2,token=0")
    assert everything["list"] == 0.2
    assert everything["token"] == 0.0
    with pytest.raises(ValueError, match="bogus"):
        parse_endpoint_values("bogus=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_endpoint_values("start=x")
    config = SimulatorConfig.from_options(
        latency="1.5",
        failure_rate=("start=0.1", "stop=0.05"),
        idle_timeout="none",
        max_concurrent_sessions=None,
        seed=3,
    )
    assert config.latency_seconds == 1.5
    assert config.failure_rate == {"start": 0.1, "stop": 0.05}
    assert config.idle_timeout_seconds is None
    assert config.max_concurrent_sessions == 10
    with pytest.raises(ValueError, match="failure_rate"):
        SimulatorConfig(failure_rate={"start": 2})
    with pytest.raises(ValueError, match="unknown"):
        SimulatorConfig().with_changes(nope=1)
    assert create_app(config) is not None


def test_run_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.simulator", "--port", "0", "--latency", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        base_url = None
        deadline = time.monotonic() + 10
        while base_url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                base_url = match.group(1)
        assert base_url is not None
        assert httpx.get(f"{base_url}/_sim/stats").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
