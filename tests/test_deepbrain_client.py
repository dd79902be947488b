"""DeepBrain client, faked only at the HTTP boundary (respx) or with real sockets."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import jwt
import pytest
import respx
from pydantic import SecretStr

from orchestrator.deepbrain import (
    DeepBrainClient,
    DeepBrainError,
    RetryPolicy,
    StartedSession,
    StopOutcome,
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
from orchestrator.deepbrain.errors import parse_retry_after

BASE = "https://deepbrain.test"
APP_ID = "app-id-SECRET-1234"
USER_KEY = "user-key-SECRET-5678"
LIVEKIT_TOKEN = "lk-token-SECRET-abcd"
SIGNING_KEY = "test-signing-key-that-is-long-enough-for-hs256"

TOKEN = "/api/v2/sessions/token"
START = "/api/v2/sessions/start"
STOP = "/api/v2/sessions/stop"
LIST = "/api/v2/sessions"


def make_jwt(expires_in: float | None, sub: str = "t") -> str:
    claims: dict[str, Any] = {"sub": sub}
    if expires_in is not None:
        claims["exp"] = int(time.time() + expires_in)
    return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")


def envelope(data: Any = None, code: int = 1000, message: str = "ok") -> dict[str, Any]:
    return {"code": code, "data": data, "message": message}


def token_reply(token: str) -> httpx.Response:
    return httpx.Response(200, json=envelope({"session_token": token}))


START_DATA = {
    "session_id": "sess-1",
    "voice_id": "voice-9",
    "max_session_duration": 20,
    "max_session_numbers": 10,
    "livekit": {"url": "wss://lk.test", "room_name": "room-1", "token": LIVEKIT_TOKEN},
}
START_BODY = {"avatar_id": "av-1", "avatar_persona": {"language": "en", "new_field": [1, 2]}}


def start_ok(status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=envelope(START_DATA, message="Session has been started"))


def fail(
    status: int, code: int, message: str = "nope", retry_after: str | None = None
) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json=envelope(None, code, message), headers=headers)


# Building an SSL context costs ~50 ms; the default transport builds one per client. Tests that
# need no real network share one context (respx still intercepts below the transport).
_SSL_CONTEXT = httpx.create_ssl_context()


def make_client(**kwargs: Any) -> DeepBrainClient:
    kwargs.setdefault("transport", httpx.HTTPTransport(verify=_SSL_CONTEXT))
    return DeepBrainClient(BASE, APP_ID, USER_KEY, **kwargs)


class Sleeps(list[float]):
    """A ``sleep`` that records the delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
def client(sleeps: Sleeps) -> Iterator[DeepBrainClient]:
    with make_client(retry=RetryPolicy(jitter="none"), sleep=sleeps) as c:
        yield c


def request_json(call: Any) -> Any:
    return json.loads(call.request.content)


# -- session token --------------------------------------------------------------------------


def test_token_is_fetched_without_auth_and_cached(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    token = make_jwt(3600)
    token_route = router.post(TOKEN).mock(return_value=token_reply(token))
    start_route = router.post(START).mock(return_value=start_ok())

    client.start_session(START_BODY)
    client.start_session(START_BODY)

    assert token_route.call_count == 1
    token_request = token_route.calls[0].request
    assert request_json(token_route.calls[0]) == {"appId": APP_ID, "userKey": USER_KEY}
    assert "authorization" not in token_request.headers
    assert "studio-api-key" not in token_request.headers
    assert start_route.call_count == 2
    for call in start_route.calls:
        assert call.request.headers["authorization"] == f"Bearer {token}"
        assert "studio-api-key" not in call.request.headers


def test_token_refreshed_when_exp_within_margin(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    short, long = make_jwt(30, "short"), make_jwt(3600, "long")  # 30 s < 60 s margin
    token_route = router.post(TOKEN).mock(side_effect=[token_reply(short), token_reply(long)])
    start_route = router.post(START).mock(return_value=start_ok())

    for _ in range(3):
        client.start_session(START_BODY)

    assert token_route.call_count == 2
    used = [c.request.headers["authorization"] for c in start_route.calls]
    assert used == [f"Bearer {short}", f"Bearer {long}", f"Bearer {long}"]


def test_token_margin_is_configurable(router: respx.MockRouter) -> None:
    token_route = router.post(TOKEN).mock(return_value=token_reply(make_jwt(30)))
    router.post(START).mock(return_value=start_ok())
    with make_client(token_refresh_margin_seconds=5) as c:
        c.start_session(START_BODY)
        c.start_session(START_BODY)
    assert token_route.call_count == 1


def test_token_without_exp_is_kept_until_a_401(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    token_route = router.post(TOKEN).mock(
        side_effect=[token_reply("opaque-1"), token_reply("opaque-2")]
    )
    start_route = router.post(START).mock(
        side_effect=[start_ok(), start_ok(), fail(401, 4010), start_ok()]
    )
    for _ in range(3):
        client.start_session(START_BODY)
    assert token_route.call_count == 2
    used = [c.request.headers["authorization"] for c in start_route.calls]
    assert used == ["Bearer opaque-1"] * 3 + ["Bearer opaque-2"]


def test_401_on_start_refreshes_token_once_then_succeeds(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    first, second = make_jwt(3600, "a"), make_jwt(3600, "b")
    token_route = router.post(TOKEN).mock(side_effect=[token_reply(first), token_reply(second)])
    start_route = router.post(START).mock(
        side_effect=[fail(401, 4010, "token expired"), start_ok()]
    )

    started = client.start_session(START_BODY)

    assert started.session_id == "sess-1"
    assert token_route.call_count == 2
    assert [c.request.headers["authorization"] for c in start_route.calls] == [
        f"Bearer {first}",
        f"Bearer {second}",
    ]
    assert started.attempts == 2
    assert started.uncertain_attempts == 0
    assert sleeps == []  # the refresh is immediate, not a backoff retry


def test_second_401_on_start_raises_auth_error(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    token_route = router.post(TOKEN).mock(
        side_effect=[token_reply(make_jwt(3600, "a")), token_reply(make_jwt(3600, "b"))]
    )
    start_route = router.post(START).mock(return_value=fail(401, 4010, "token expired"))

    with pytest.raises(VendorAuthError) as info:
        client.start_session(START_BODY)

    assert token_route.call_count == 2
    assert start_route.call_count == 2
    assert sleeps == []
    assert info.value.error_code == "VENDOR_4010"
    assert info.value.attempts == 2


def test_token_endpoint_rejecting_credentials_fails_start_without_start_call(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    router.post(TOKEN).mock(return_value=fail(401, 4010, "bad appId or userKey"))
    start_route = router.post(START).mock(return_value=start_ok())
    with pytest.raises(VendorAuthError) as info:
        client.start_session(START_BODY)
    assert info.value.endpoint == f"POST {TOKEN}"
    assert start_route.call_count == 0
    assert info.value.attempts == 0  # no start request was sent


def test_token_endpoint_5xx_is_retried_and_not_an_uncertain_start(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    router.post(TOKEN).mock(side_effect=[fail(503, 5000), token_reply(make_jwt(3600))])
    router.post(START).mock(return_value=start_ok())
    started = client.start_session(START_BODY)
    assert sleeps == [0.5]
    assert (started.attempts, started.uncertain_attempts) == (1, 0)


def test_only_one_thread_refreshes_the_token(router: respx.MockRouter) -> None:
    def slow_token(request: httpx.Request) -> httpx.Response:
        time.sleep(0.05)  # widen the race window
        return token_reply(make_jwt(3600))

    token_route = router.post(TOKEN).mock(side_effect=slow_token)
    router.post(START).mock(return_value=start_ok())
    errors: list[BaseException] = []
    with make_client() as c:

        def work() -> None:
            try:
                c.start_session(START_BODY)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert errors == []
    assert token_route.call_count == 1


# -- start ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_start_success_parses_reply_and_sends_body_as_given(
    client: DeepBrainClient, router: respx.MockRouter, status: int
) -> None:
    router.post(TOKEN).mock(return_value=token_reply(make_jwt(3600)))
    start_route = router.post(START).mock(return_value=start_ok(status))

    started = client.start_session(START_BODY)

    assert started == StartedSession(
        session_id="sess-1",
        voice_id="voice-9",
        max_session_duration=20,
        max_session_numbers=10,
        livekit_url="wss://lk.test",
        livekit_room="room-1",
        livekit_token=LIVEKIT_TOKEN,
        attempts=1,
        uncertain_attempts=0,
    )
    assert request_json(start_route.calls[0]) == START_BODY
    assert start_route.calls[0].request.headers["content-type"] == "application/json"
    assert LIVEKIT_TOKEN not in repr(started)


def test_start_without_voice_id(client: DeepBrainClient, router: respx.MockRouter) -> None:
    router.post(TOKEN).mock(return_value=token_reply(make_jwt(3600)))
    data = {k: v for k, v in START_DATA.items() if k not in ("voice_id", "max_session_numbers")}
    router.post(START).mock(return_value=httpx.Response(201, json=envelope(data)))
    started = client.start_session({"avatar_id": "av-1"})
    assert started.voice_id is None
    assert started.max_session_numbers is None
    assert started.max_session_duration == 20


@pytest.mark.parametrize("stop_works", [True, False], ids=["stopped", "stop-failed"])
def test_start_success_with_malformed_data_stops_the_session_it_made(
    client: DeepBrainClient,
    router: respx.MockRouter,
    caplog: pytest.LogCaptureFixture,
    stop_works: bool,
) -> None:
    """A reply naming the session it created but not what a session needs (no LiveKit block):
    not retried, and the session is stopped at once; if that stop fails, the attempt is
    uncertain (the reconciler stops the orphan)."""
    router.post(TOKEN).mock(return_value=token_reply(make_jwt(3600)))
    start_route = router.post(START).mock(
        return_value=httpx.Response(200, json=envelope({"session_id": "sess-x"}))
    )
    stop_route = router.post(STOP).mock(
        return_value=httpx.Response(200, json=envelope(None))
        if stop_works
        else fail(400, 4000, "no")
    )
    with (
        caplog.at_level(logging.WARNING, "orchestrator.deepbrain"),
        pytest.raises(DeepBrainError) as info,
    ):
        client.start_session(START_BODY)
    assert type(info.value) is DeepBrainError
    assert start_route.call_count == 1
    assert [request_json(c)["session_id"] for c in stop_route.calls] == ["sess-x"]
    assert "sess-x" in str(info.value)
    assert info.value.uncertain_attempts == (0 if stop_works else 1)
    assert info.value.error_code == "VENDOR_BAD_REPLY"


@pytest.mark.parametrize(
    ("reply", "uncertain"),
    [
        (fail(200, 1001, "started?"), 1),  # success status, unknown code: maybe created
        (fail(418, 4180, "teapot"), 0),  # the vendor refused
    ],
)
def test_start_unclassified_reply_is_not_retried(
    client: DeepBrainClient, router: respx.MockRouter, reply: httpx.Response, uncertain: int
) -> None:
    router.post(TOKEN).mock(return_value=token_reply(make_jwt(3600)))
    start_route = router.post(START).mock(return_value=reply)
    with pytest.raises(DeepBrainError) as info:
        client.start_session(START_BODY)
    assert type(info.value) is DeepBrainError
    assert start_route.call_count == 1
    assert info.value.uncertain_attempts == uncertain


def test_start_4xx_is_not_retried(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    router.post(TOKEN).mock(return_value=token_reply(make_jwt(3600)))
    start_route = router.post(START).mock(return_value=fail(402, 4020, "Out of credits"))
    with pytest.raises(VendorOutOfCredits) as info:
        client.start_session(START_BODY)
    assert start_route.call_count == 1
    assert sleeps == []
    assert info.value.error_code == "VENDOR_4020"
    assert (info.value.attempts, info.value.uncertain_attempts) == (1, 0)


def test_start_429_retried_freely_and_certain(
    client: DeepBrainClient,
    router: respx.MockRouter,
    sleeps: Sleeps,
    caplog: pytest.LogCaptureFixture,
) -> None:
    router.post(TOKEN).mock(return_value=token_reply(make_jwt(3600)))
    router.post(START).mock(side_effect=[fail(429, 4290, retry_after="2"), start_ok()])
    with caplog.at_level(logging.INFO, "orchestrator.deepbrain"):
        started = client.start_session(START_BODY)
    assert (started.attempts, started.uncertain_attempts) == (2, 0)
    assert sleeps == [2.0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_start_5xx_then_success_is_counted_uncertain_and_warned(
    client: DeepBrainClient,
    router: respx.MockRouter,
    sleeps: Sleeps,
    caplog: pytest.LogCaptureFixture,
) -> None:
    router.post(TOKEN).mock(return_value=token_reply(make_jwt(3600)))
    router.post(START).mock(side_effect=[fail(500, 5000, "SESSION_ROOM_NOT_FOUND"), start_ok()])
    with caplog.at_level(logging.INFO, "orchestrator.deepbrain"):
        started = client.start_session(START_BODY)
    assert (started.attempts, started.uncertain_attempts) == (2, 1)
    assert sleeps == [0.5]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "uncertain" in warnings[0].getMessage()
    retry_lines = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retry_lines) == 1
    assert "VENDOR_5000" in retry_lines[0].getMessage()
    assert f"POST {START}" in retry_lines[0].getMessage()


def test_start_connect_error_is_certain_read_timeout_is_uncertain(
    client: DeepBrainClient, router: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    router.post(TOKEN).mock(return_value=token_reply(make_jwt(3600)))
    router.post(START).mock(side_effect=[httpx.ConnectError, httpx.ReadTimeout, start_ok()])
    with caplog.at_level(logging.WARNING, "orchestrator.deepbrain"):
        started = client.start_session(START_BODY)
    assert (started.attempts, started.uncertain_attempts) == (3, 1)
    assert len(caplog.records) == 1
    assert "VENDOR_TIMEOUT" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("effect", "uncertain", "error_code"),
    [
        (httpx.ConnectError, False, "VENDOR_UNREACHABLE"),
        (httpx.ConnectTimeout, False, "VENDOR_UNREACHABLE"),
        (httpx.PoolTimeout, False, "VENDOR_TIMEOUT"),
        (httpx.ReadTimeout, True, "VENDOR_TIMEOUT"),
        (httpx.WriteTimeout, True, "VENDOR_TIMEOUT"),
        (httpx.RemoteProtocolError, True, "VENDOR_NETWORK_ERROR"),
        (httpx.ReadError, True, "VENDOR_NETWORK_ERROR"),
    ],
)
def test_network_failures_exhaust_retries_with_uncertain_flag(
    client: DeepBrainClient,
    router: respx.MockRouter,
    sleeps: Sleeps,
    effect: type[Exception],
    uncertain: bool,
    error_code: str,
) -> None:
    router.post(TOKEN).mock(return_value=token_reply(make_jwt(3600)))
    start_route = router.post(START).mock(side_effect=effect)
    with pytest.raises(VendorUnavailable) as info:
        client.start_session(START_BODY)
    exc = info.value
    assert start_route.call_count == 4
    assert sleeps == [0.5, 1.0, 2.0]
    assert exc.uncertain is uncertain
    assert exc.error_code == error_code
    assert exc.retryable
    assert exc.code is None
    assert exc.http_status is None
    assert (exc.attempts, exc.uncertain_attempts) == (4, 4 if uncertain else 0)


# -- error mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls", "error_code", "retryable"),
    [
        (400, 4000, VendorValidationError, "VENDOR_4000", False),
        (422, 4000, VendorValidationError, "VENDOR_4000", False),
        (401, 4010, VendorAuthError, "VENDOR_4010", False),
        (402, 4020, VendorOutOfCredits, "VENDOR_4020", False),
        (403, 4030, VendorForbidden, "VENDOR_4030", False),
        (404, 4040, VendorNotFound, "VENDOR_4040", False),
        (409, 4090, VendorConflict, "VENDOR_4090", False),
        (429, 4290, VendorRateLimited, "VENDOR_4290", True),
        (500, 5000, VendorServerError, "VENDOR_5000", True),
        (200, 4020, VendorOutOfCredits, "VENDOR_4020", False),  # 2xx with an error code
        (400, 4999, VendorValidationError, "VENDOR_4999", False),  # unknown code: by status
        (503, 5031, VendorServerError, "VENDOR_5031", True),
        (418, 4180, DeepBrainError, "VENDOR_4180", False),
        (200, 1001, DeepBrainError, "VENDOR_1001", False),
    ],
)
def test_each_code_maps_to_its_exception(
    router: respx.MockRouter,
    status: int,
    code: int,
    cls: type[DeepBrainError],
    error_code: str,
    retryable: bool,
) -> None:
    route = router.get(f"{LIST}/sess-1").mock(
        return_value=fail(status, code, "Something\nwent wrong")
    )
    with (
        make_client(retry=RetryPolicy(max_attempts=1)) as c,
        pytest.raises(DeepBrainError) as info,
    ):
        c.get_session("sess-1")
    exc = info.value
    assert type(exc) is cls
    assert route.call_count == 1
    assert exc.code == code
    assert exc.http_status == status
    assert exc.vendor_message == "Something went wrong"
    assert exc.endpoint == f"GET {LIST}/sess-1"
    assert exc.error_code == error_code
    assert exc.retryable is retryable
    text = str(exc)
    assert "\n" not in text
    for part in (f"GET {LIST}/sess-1", f"HTTP {status}", f"code {code}", "Something went wrong"):
        assert part in text


def test_exceptions_survive_pickling() -> None:
    exc = VendorUnavailable("POST /x", "ReadTimeout", uncertain=True, kind_code="VENDOR_TIMEOUT")
    exc.attempts = 3
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is VendorUnavailable
    assert (copy.uncertain, copy.error_code, copy.attempts, str(copy)) == (
        True,
        "VENDOR_TIMEOUT",
        3,
        str(exc),
    )
    limited = VendorRateLimited("GET /y", "slow down", code=4290, http_status=429)
    assert pickle.loads(pickle.dumps(limited)).error_code == "VENDOR_4290"


# -- non-JSON and envelope-less replies ------------------------------------------------------


def test_non_json_2xx_is_a_server_error(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    route = router.get(LIST).mock(
        return_value=httpx.Response(
            200, text="<html>oops</html>", headers={"content-type": "text/html"}
        )
    )
    with pytest.raises(VendorServerError) as info:
        client.list_sessions()
    assert route.call_count == 4
    assert info.value.code is None
    assert info.value.error_code == "VENDOR_HTTP_200"
    assert "non-JSON" in info.value.vendor_message
    assert "oops" not in str(info.value)


def test_json_without_envelope_is_a_server_error(router: respx.MockRouter) -> None:
    router.get(f"{LIST}/s").mock(return_value=httpx.Response(200, json={"sessionId": "s"}))
    with (
        make_client(retry=RetryPolicy(max_attempts=1)) as c,
        pytest.raises(VendorServerError, match="without the vendor envelope"),
    ):
        c.get_session("s")


def test_5xx_garbage_is_retried_then_server_error(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    route = router.post(STOP).mock(return_value=httpx.Response(502, text="Bad Gateway"))
    with pytest.raises(VendorServerError) as info:
        client.stop_session("sess-1", "USER_CLOSED")
    assert route.call_count == 4
    assert sleeps == [0.5, 1.0, 2.0]
    assert info.value.error_code == "VENDOR_HTTP_502"
    assert info.value.attempts == 4


def test_5xx_exhausts_max_attempts(router: respx.MockRouter, sleeps: Sleeps) -> None:
    route = router.get(LIST).mock(return_value=fail(500, 5000, "boom"))
    policy = RetryPolicy(max_attempts=6, base_delay=1.0, max_delay=4.0, jitter="none")
    with (
        make_client(retry=policy, sleep=sleeps) as c,
        pytest.raises(VendorServerError),
    ):
        c.list_sessions()
    assert route.call_count == 6
    assert sleeps == [1.0, 2.0, 4.0, 4.0, 4.0]  # capped at max_delay


def test_retry_logs_one_line_per_retry(
    client: DeepBrainClient, router: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    router.get(LIST).mock(
        side_effect=[
            fail(503, 5000),
            fail(429, 4290),
            httpx.Response(200, json=envelope({"results": [], "next": None})),
        ]
    )
    with caplog.at_level(logging.DEBUG, "orchestrator.deepbrain"):
        assert client.list_sessions() == []
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.deepbrain"]
    assert len(lines) == 2
    assert "attempt 1/4" in lines[0]
    assert "VENDOR_5000" in lines[0]
    assert "HTTP 503" in lines[0]
    assert "attempt 2/4" in lines[1]
    assert "VENDOR_4290" in lines[1]
    assert "1.00s" in lines[1]


# -- Retry-After ----------------------------------------------------------------------------


def test_retry_after_seconds_is_honoured(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    route = router.post(STOP).mock(
        side_effect=[
            fail(429, 4290, "slow down", retry_after="3"),
            fail(429, 4290, "slow down", retry_after="0"),
            httpx.Response(200, json=envelope(None)),
        ]
    )
    assert client.stop_session("sess-1", "USER_CLOSED") is StopOutcome.STOPPED
    assert route.call_count == 3
    assert sleeps == [3.0, 1.0]  # max(Retry-After, backoff)


def test_retry_after_http_date_is_honoured(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=6), usegmt=True)
    router.get(LIST).mock(
        side_effect=[
            fail(429, 4290, retry_after=when),
            httpx.Response(200, json=envelope({"results": [], "next": None})),
        ]
    )
    client.list_sessions()
    assert len(sleeps) == 1
    assert 4.0 < sleeps[0] <= 6.0


def test_retry_after_too_long_gives_up(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    route = router.post(STOP).mock(return_value=fail(429, 4290, "later", retry_after="120"))
    with pytest.raises(VendorRateLimited) as info:
        client.stop_session("sess-1", "USER_CLOSED")
    assert route.call_count == 1
    assert sleeps == []
    assert info.value.retry_after_seconds == 120.0


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("5", now=now) == 5.0
    assert parse_retry_after(" 1.5 ", now=now) == 1.5
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0  # past
    for bad in (None, "", "-1", "nan", "soon"):
        assert parse_retry_after(bad, now=now) is None


def test_backoff_jitter_bounds() -> None:
    equal = RetryPolicy(base_delay=1.0, max_delay=8.0, jitter="equal")
    full = RetryPolicy(base_delay=1.0, max_delay=8.0, jitter="full")
    for retry_number, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        for _ in range(50):
            assert cap / 2 <= equal.backoff(retry_number) <= cap
            assert 0 <= full.backoff(retry_number) <= cap
    assert equal.backoff(1, rand=lambda: 0.0) == 0.5
    assert equal.backoff(1, rand=lambda: 1.0) == 1.0
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_default_policy_jitters_real_delays(router: respx.MockRouter, sleeps: Sleeps) -> None:
    router.get(LIST).mock(return_value=fail(503, 5000))
    with (
        make_client(sleep=sleeps) as c,
        pytest.raises(VendorServerError),
    ):
        c.list_sessions()
    assert len(sleeps) == 3
    for delay, cap in zip(sleeps, [0.5, 1.0, 2.0], strict=True):
        assert cap / 2 <= delay <= cap


# -- stop -----------------------------------------------------------------------------------


def test_stop_uses_user_key_and_sends_reason(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    token_route = router.post(TOKEN)
    route = router.post(STOP).mock(return_value=httpx.Response(200, json=envelope(None)))
    assert client.stop_session("sess-1", "MAX_DURATION_REACHED") is StopOutcome.STOPPED
    request = route.calls[0].request
    assert request.headers["studio-api-key"] == USER_KEY
    assert "authorization" not in request.headers
    assert request_json(route.calls[0]) == {
        "session_id": "sess-1",
        "reason": "MAX_DURATION_REACHED",
    }
    assert token_route.call_count == 0


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (fail(409, 4090, "already ended"), StopOutcome.ALREADY_ENDED),
        (fail(404, 4040, "unknown session"), StopOutcome.NOT_FOUND),
        (fail(200, 4090, "already ended"), StopOutcome.ALREADY_ENDED),
    ],
)
def test_stop_conflict_and_not_found_are_outcomes(
    client: DeepBrainClient,
    router: respx.MockRouter,
    sleeps: Sleeps,
    reply: httpx.Response,
    outcome: StopOutcome,
) -> None:
    route = router.post(STOP).mock(return_value=reply)
    assert client.stop_session("sess-1", "USER_CLOSED") is outcome
    assert route.call_count == 1
    assert sleeps == []


def test_stop_404_without_vendor_envelope_raises(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    router.post(STOP).mock(return_value=httpx.Response(404, text="<h1>Not Found</h1>"))
    with pytest.raises(VendorNotFound) as info:
        client.stop_session("sess-1", "USER_CLOSED")
    assert info.value.code is None
    assert info.value.error_code == "VENDOR_HTTP_404"


def test_stop_401_raises_at_once_without_token_refresh(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    token_route = router.post(TOKEN)
    route = router.post(STOP).mock(return_value=fail(401, 4010, "invalid key"))
    with pytest.raises(VendorAuthError):
        client.stop_session("sess-1", "USER_CLOSED")
    assert route.call_count == 1
    assert token_route.call_count == 0
    assert sleeps == []


def test_stop_retries_after_read_timeout(
    client: DeepBrainClient, router: respx.MockRouter, sleeps: Sleeps
) -> None:
    router.post(STOP).mock(side_effect=[httpx.ReadTimeout, fail(409, 4090)])
    assert client.stop_session("sess-1", "USER_CLOSED") is StopOutcome.ALREADY_ENDED
    assert sleeps == [0.5]


def test_empty_session_id_is_rejected(client: DeepBrainClient) -> None:
    with pytest.raises(ValueError, match="session_id"):
        client.stop_session("", "USER_CLOSED")
    with pytest.raises(ValueError, match="session_id"):
        client.get_session(" ")


# -- list -----------------------------------------------------------------------------------


def row(session_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "sessionId": session_id,
        "created_at": "2025-01-01T10:00:00Z",
        "updated_at": "2025-01-01T10:05:00+00:00",
        "duration": 300,
        "source": "api",
        "credits_consumed": 1.5,
        **extra,
    }


def test_list_follows_all_pages(client: DeepBrainClient, router: respx.MockRouter) -> None:
    pages = {
        "1": {
            "count": 5,
            "next": f"{BASE}{LIST}?page=2",
            "previous": None,
            "results": [row("a"), row("b")],
        },
        "2": {
            "count": 5,
            "next": f"{BASE}{LIST}?page=3",
            "previous": "p1",
            "results": [row("c"), row("d")],
        },
        "3": {"count": 5, "next": None, "previous": "p2", "results": [row("e")]},
    }

    def by_page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=envelope(pages[request.url.params["page"]]))

    route = router.get(LIST).mock(side_effect=by_page)
    sessions = client.list_sessions("historic", page_size=2)

    assert [s.session_id for s in sessions] == ["a", "b", "c", "d", "e"]
    assert route.call_count == 3
    for number, call in enumerate(route.calls, start=1):
        params = call.request.url.params
        assert (params["page"], params["page_size"], params["type"]) == (
            str(number),
            "2",
            "historic",
        )
        assert call.request.headers["studio-api-key"] == USER_KEY
        assert "authorization" not in call.request.headers
    first = sessions[0]
    assert first.created_at == datetime(2025, 1, 1, 10, 0, tzinfo=UTC)
    assert first.duration == 300.0
    assert first.credits_consumed == 1.5
    assert first.end_at is None
    assert first.raw["source"] == "api"


def test_list_defaults_to_active_and_deduplicates(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    route = router.get(LIST).mock(
        side_effect=[
            httpx.Response(200, json=envelope({"next": "2", "results": [row("a"), row("b")]})),
            httpx.Response(200, json=envelope({"next": None, "results": [row("b"), row("c")]})),
        ]
    )
    assert [s.session_id for s in client.list_sessions()] == ["a", "b", "c"]
    params = route.calls[0].request.url.params
    assert (params["type"], params["page_size"]) == ("active", "100")


def test_list_malformed_row_raises_rather_than_dropping_it(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    router.get(LIST).mock(
        return_value=httpx.Response(200, json=envelope({"next": None, "results": [{"id": "x"}]}))
    )
    with pytest.raises(DeepBrainError, match="sessionId missing"):
        client.list_sessions()


def test_list_arguments_are_validated(client: DeepBrainClient) -> None:
    with pytest.raises(ValueError, match="page_size"):
        client.list_sessions(page_size=101)
    with pytest.raises(ValueError, match="kind"):
        client.list_sessions("ended")  # type: ignore[arg-type]


# -- detail ---------------------------------------------------------------------------------


def test_detail_parses_timestamps_and_end_reason(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    data = row(
        "sess/1",
        created_at="2025-01-01T10:00:00.250Z",
        updated_at="2025-01-01T19:10:00+09:00",
        end_at="2025-01-01T10:10:00",
        duration="600.5",
        end_reason="IDLE_TIMEOUT",
        custom="kept",
    )
    route = router.get(f"{LIST}/sess%2F1").mock(
        return_value=httpx.Response(200, json=envelope(data))
    )

    session = client.get_session("sess/1")

    assert route.call_count == 1
    assert route.calls[0].request.headers["studio-api-key"] == USER_KEY
    assert session.session_id == "sess/1"
    assert session.created_at == datetime(2025, 1, 1, 10, 0, 0, 250000, tzinfo=UTC)
    assert session.updated_at == datetime(2025, 1, 1, 19, 10, tzinfo=timezone(timedelta(hours=9)))
    assert session.updated_at is not None
    assert session.updated_at.utcoffset() == timedelta(hours=9)
    assert session.end_at == datetime(2025, 1, 1, 10, 10, tzinfo=UTC)  # naive taken as UTC
    assert session.duration == 600.5
    assert session.end_reason == "IDLE_TIMEOUT"
    assert session.source == "api"
    assert session.raw["custom"] == "kept"


def test_detail_tolerates_missing_and_null_fields(
    client: DeepBrainClient, router: respx.MockRouter
) -> None:
    router.get(f"{LIST}/s2").mock(
        return_value=httpx.Response(
            200, json=envelope({"sessionId": "s2", "end_at": None, "created_at": "garbage"})
        )
    )
    session = client.get_session("s2")
    assert (session.created_at, session.updated_at, session.end_at) == (None, None, None)
    assert (session.duration, session.end_reason, session.source) == (None, None, None)


def test_detail_404_raises_not_found(client: DeepBrainClient, router: respx.MockRouter) -> None:
    router.get(f"{LIST}/gone").mock(return_value=fail(404, 4040, "Session not found"))
    with pytest.raises(VendorNotFound) as info:
        client.get_session("gone")
    assert info.value.error_code == "VENDOR_4040"


# -- secrets --------------------------------------------------------------------------------


def test_secrets_never_in_repr_str_exceptions_or_logs(
    router: respx.MockRouter, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    session_token = make_jwt(3600)
    router.post(TOKEN).mock(return_value=token_reply(session_token))
    router.post(START).mock(
        side_effect=[
            fail(401, 4010, f"token {session_token} expired"),
            fail(503, 5000, f"backend saw key {USER_KEY}"),
            httpx.ReadTimeout,
            start_ok(),
        ]
    )
    router.post(STOP).mock(
        return_value=fail(400, 4000, f"bad request from app {APP_ID} key {USER_KEY}")
    )
    errors: list[DeepBrainError] = []
    with caplog.at_level(logging.DEBUG):
        client = DeepBrainClient(
            BASE,
            SecretStr(APP_ID),
            SecretStr(USER_KEY),
            transport=httpx.HTTPTransport(verify=_SSL_CONTEXT),
            retry=RetryPolicy(max_attempts=5),
            sleep=sleeps,
        )
        started = client.start_session(START_BODY)
        try:
            client.stop_session("sess-1", "USER_CLOSED")
        except DeepBrainError as exc:
            errors.append(exc)
        client.close()

    assert started.uncertain_attempts == 2
    assert len(errors) == 1
    texts = [repr(client), str(client), repr(started), str(started)]
    for error in errors:
        texts += [str(error), repr(error), error.vendor_message, repr(error.args)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.__dict__) for record in caplog.records]
    blob = "\n".join(texts)
    for secret in (APP_ID, USER_KEY, session_token, LIVEKIT_TOKEN, "SECRET"):
        assert secret not in blob
    assert "***" in errors[0].vendor_message  # redacted, not dropped
    assert caplog.records  # the scenario did log


def test_each_thread_gets_its_own_client_with_no_cap() -> None:
    """One shared pool serialises hundreds of threads; each thread keeps its own client, a
    finished thread's client is closed, and any number of threads may call at once (the
    worker's pool bounds them: a cap here turned into failed starts)."""
    with DeepBrainClient(BASE, APP_ID, USER_KEY) as c:
        mine = c._http
        assert c._http is mine  # the same thread reuses its client
        others: list[object] = []
        barrier = threading.Barrier(300)

        def grab_together() -> None:
            others.append(c._http)
            barrier.wait()

        threads = [threading.Thread(target=grab_together) for _ in range(300)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len({id(o) for o in others}) == 300 and mine not in others
        late = threading.Thread(target=lambda: others.append(c._http))
        late.start()
        late.join()
        assert len(c._connections) == 2  # this thread's and the latest; the ended ones' closed


def test_empty_credentials_are_rejected() -> None:
    with pytest.raises(ValueError, match="user_key"):
        DeepBrainClient(BASE, APP_ID, SecretStr(""))


# -- real timeouts and sockets --------------------------------------------------------------


def test_tiny_timeout_is_passed_to_the_transport(router: respx.MockRouter) -> None:
    seen: list[dict[str, float | None]] = []

    def hang(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        raise httpx.ReadTimeout("timed out", request=request)

    router.get(f"{LIST}/s").mock(side_effect=hang)
    with (
        make_client(
            timeout_seconds=0.01,
            retry=RetryPolicy(max_attempts=2),
            sleep=lambda _: None,
        ) as c,
        pytest.raises(VendorUnavailable) as info,
    ):
        c.get_session("s")
    assert seen == [{"connect": 0.01, "read": 0.01, "write": 0.01, "pool": 0.01}] * 2
    assert info.value.uncertain is True
    assert info.value.error_code == "VENDOR_TIMEOUT"
    assert "0.01s" in str(info.value)


def test_hanging_vendor_ends_with_uncertain_unavailable() -> None:
    """A real socket that accepts connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        started = time.monotonic()
        with (
            DeepBrainClient(
                f"http://127.0.0.1:{port}",
                APP_ID,
                USER_KEY,
                timeout_seconds=0.2,
                retry=RetryPolicy(max_attempts=2, base_delay=0.01, jitter="none"),
            ) as c,
            pytest.raises(VendorUnavailable) as info,
        ):
            c.stop_session("sess-1", "USER_CLOSED")
        elapsed = time.monotonic() - started
    assert info.value.uncertain is True
    assert info.value.error_code == "VENDOR_TIMEOUT"
    assert info.value.attempts == 2
    assert 0.4 <= elapsed < 3.0


def test_refused_connection_is_certain_unreachable(sleeps: Sleeps) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the call: connection refused
    with (
        DeepBrainClient(
            f"http://127.0.0.1:{port}", APP_ID, USER_KEY, timeout_seconds=2, sleep=sleeps
        ) as c,
        pytest.raises(VendorUnavailable) as info,
    ):
        c.start_session(START_BODY)
    assert info.value.uncertain is False
    assert info.value.error_code == "VENDOR_UNREACHABLE"
    assert info.value.endpoint == f"POST {TOKEN}"  # the token call never got through
    assert info.value.uncertain_attempts == 0
    assert len(sleeps) == 3


def test_no_retry_starts_that_could_not_end_before_the_deadline() -> None:
    """Waits 1, 2, 4 s (no jitter), attempts of up to 1 s, deadline at 5 s: the third retry
    would end at 3 + 4 + 1 = 8 s, so the call gives up after three attempts."""
    from orchestrator.deepbrain.errors import VendorServerError
    from orchestrator.deepbrain.retry import call_with_retry

    now = [0.0]
    calls: list[float] = []

    def attempt() -> None:
        calls.append(now[0])
        raise VendorServerError("POST /x", "down", http_status=503)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(VendorServerError) as raised:
        call_with_retry(
            attempt,
            policy=RetryPolicy(max_attempts=10, base_delay=1.0, max_delay=60, jitter="none"),
            sleep=sleep,
            endpoint="POST /x",
            deadline=5.0,
            attempt_seconds=1.0,
            clock=lambda: now[0],
        )
    assert calls == [0.0, 1.0, 3.0]
    assert raised.value.attempts == 3
