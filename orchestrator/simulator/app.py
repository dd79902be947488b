"""The aiohttp application: the fake DeepBrain API plus the ``/_sim/`` admin API.

Vendor endpoints answer the documented envelope ``{"code", "data", "message"}``
with the documented HTTP statuses and codes. Before its handler runs, every
vendor request goes through the same pipeline: count it, take a scripted
fault if one is queued, sleep the configured latency (``asyncio.sleep``, so
hundreds of requests can wait at once), then maybe fail at random.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from orchestrator.simulator.config import DEFAULT_MESSAGES, ENDPOINTS, Fault, SimulatorConfig
from orchestrator.simulator.state import SimulatorState

logger = logging.getLogger("orchestrator.simulator")

STATE_KEY: Final = web.AppKey("simulator_state", SimulatorState)

API_PREFIX: Final = "/api/v2/sessions"
ADMIN_PREFIX: Final = "/_sim"
STOP_REASON_DEFAULT: Final = "USER_CLOSED"


class ApiError(Exception):
    """An error reply in the vendor envelope."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message if message is not None else DEFAULT_MESSAGES.get(code, "error")
        self.headers = dict(headers or {})
        super().__init__(self.message)


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


def envelope(
    status: int,
    code: int,
    message: str,
    data: Any = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        {"code": code, "data": data, "message": message}, status=status, headers=headers
    )


def _ok(data: Any, message: str = "success", status: int = 200) -> web.Response:
    return envelope(status, 1000, message, data)


def _state(request: web.Request) -> SimulatorState:
    return request.app[STATE_KEY]


# -- body and auth helpers -------------------------------------------------------


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise ApiError(400, 4000, "request body must be a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, 4000, "request body is not valid JSON") from None


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, 4000, "request body must be a JSON object")
    return body


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _require_bearer(request: web.Request) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, 4010, "missing session token (Authorization: Bearer ...)")
    if not _state(request).check_session_token(token.strip()):
        raise ApiError(401, 4010, "session token invalid or expired")


def _require_api_key(request: web.Request) -> None:
    key = request.headers.get("STUDIO-API-KEY")
    if not key:
        raise ApiError(401, 4010, "missing STUDIO-API-KEY header")
    if not _same(key, _state(request).config.user_key):
        raise ApiError(401, 4010, "invalid STUDIO-API-KEY")


def _non_empty_string(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, 4000, f"{name} is required and must be a non-empty string")
    return value


def _optional_string(body: Mapping[str, Any], name: str, label: str | None = None) -> None:
    if name in body and not isinstance(body[name], str):
        raise ApiError(400, 4000, f"{label or name} must be a string")


# -- vendor endpoints ----------------------------------------------------------------


async def handle_token(request: web.Request) -> web.Response:
    body = await _json_object(request)
    app_id = _non_empty_string(body, "appId")
    user_key = _non_empty_string(body, "userKey")
    state = _state(request)
    cfg = state.config
    # Evaluate both comparisons: no short-circuit timing hint.
    app_ok = _same(app_id, cfg.app_id)
    key_ok = _same(user_key, cfg.user_key)
    if not (app_ok and key_ok):
        raise ApiError(401, 4010, "invalid appId or userKey")
    return _ok({"session_token": state.mint_session_token()})


def _validate_persona(persona: Any) -> None:
    if not isinstance(persona, dict):
        raise ApiError(400, 4000, "avatar_persona must be an object")
    _optional_string(persona, "language", "avatar_persona.language")
    llm = persona.get("llm_configurations")
    if llm is None:
        return
    prefix = "avatar_persona.llm_configurations"
    if not isinstance(llm, dict):
        raise ApiError(400, 4000, f"{prefix} must be an object")
    _optional_string(llm, "provider", f"{prefix}.provider")
    _optional_string(llm, "model", f"{prefix}.model")
    temperature = llm.get("temperature")
    if "temperature" in llm and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float)
    ):
        raise ApiError(400, 4000, f"{prefix}.temperature must be a number")
    custom = llm.get("custom_settings")
    if custom is not None:
        if not isinstance(custom, dict):
            raise ApiError(400, 4000, f"{prefix}.custom_settings must be an object")
        _optional_string(custom, "greeting_text", f"{prefix}.custom_settings.greeting_text")
        _optional_string(custom, "system_prompt", f"{prefix}.custom_settings.system_prompt")
    if "custom_http" in llm and not isinstance(llm["custom_http"], dict):
        raise ApiError(400, 4000, f"{prefix}.custom_http must be an object")


async def handle_start(request: web.Request) -> web.Response:
    _require_bearer(request)
    body = await _json_object(request)
    state = _state(request)
    cfg = state.config
    avatar_id = _non_empty_string(body, "avatar_id")
    requested: int | None = None
    if "max_session_duration" in body:
        value = body["max_session_duration"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, 4000, "max_session_duration must be an integer number of minutes")
        if value < 1:
            raise ApiError(400, 4000, "max_session_duration must be at least 1 minute")
        if value > cfg.plan_max_minutes:
            raise ApiError(
                400,
                4000,
                f"max_session_duration exceeds the plan limit of {cfg.plan_max_minutes} minutes",
            )
        requested = value
    if "avatar_persona" in body:
        _validate_persona(body["avatar_persona"])
    _optional_string(body, "lip_audio_mode")
    _optional_string(body, "greeting_text")

    session = state.create_session(
        avatar_id=avatar_id,
        requested_minutes=requested,
        request_body=body,
        request_content_type=request.headers.get("Content-Type"),
    )
    if session is None:
        raise ApiError(cfg.limit_status, cfg.limit_code, cfg.limit_message)
    data: dict[str, Any] = {"session_id": session.session_id}
    if session.voice_id is not None:
        data["voice_id"] = session.voice_id
    data.update(
        {
            "max_session_duration": session.granted_minutes,
            "max_session_numbers": cfg.max_concurrent_sessions,
            "livekit": {
                "url": session.livekit_url,
                "room_name": session.room_name,
                "token": session.livekit_token,
            },
        }
    )
    return _ok(data, "Session has been started", cfg.start_http_status)


def _session_outcome_error(outcome: str) -> ApiError | None:
    if outcome == "unknown":
        return ApiError(404, 4040, "session not found")
    if outcome == "ended":
        return ApiError(409, 4090, "session has already ended")
    return None


def _number(value: float | None) -> float | int | None:
    if value is None:
        return None
    return int(value) if float(value).is_integer() else value


async def handle_ping(request: web.Request) -> web.Response:
    _require_bearer(request)
    state = _state(request)
    error = _session_outcome_error(state.touch(request.match_info["session_id"], "ping"))
    if error is not None:
        raise error
    idle = state.config.idle_timeout_seconds
    return _ok(
        {
            "idle_timeout_sec": _number(idle),
            "next_ping_recommended_sec": _number(None if idle is None else round(idle * 2 / 3, 3)),
        }
    )


async def handle_talk(request: web.Request) -> web.Response:
    _require_bearer(request)
    body = await _json_object(request)
    _non_empty_string(body, "message")
    _optional_string(body, "type")
    session_id = request.match_info["session_id"]
    error = _session_outcome_error(_state(request).touch(session_id, "talk"))
    if error is not None:
        raise error
    return _ok({"session_id": session_id})


async def handle_stop(request: web.Request) -> web.Response:
    _require_api_key(request)
    body = await _json_object(request)
    session_id = _non_empty_string(body, "session_id")
    reason = body.get("reason", STOP_REASON_DEFAULT)
    if not isinstance(reason, str) or not reason:
        raise ApiError(400, 4000, "reason must be a non-empty string")
    error = _session_outcome_error(_state(request).end_session(session_id, reason))
    if error is not None:
        raise error
    return _ok({"session_id": session_id, "reason": reason}, "Session has been stopped")


def _int_query(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, 4000, f"{name} must be an integer") from None


async def handle_list(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = _state(request)
    page = _int_query(request, "page", 1)
    page_size = _int_query(request, "page_size", state.config.list_default_page_size)
    if page < 1:
        raise ApiError(400, 4000, "page must be >= 1")
    if not 1 <= page_size <= 100:
        raise ApiError(400, 4000, "page_size must be between 1 and 100")
    kind = request.query.get("type") or None
    if kind not in (None, "active", "historic"):
        raise ApiError(400, 4000, "type must be active or historic")
    count, rows = state.list_rows(kind, page, page_size)
    next_url = str(request.url.update_query(page=page + 1)) if page * page_size < count else None
    previous_url = str(request.url.update_query(page=page - 1)) if page > 1 else None
    return _ok({"count": count, "next": next_url, "previous": previous_url, "results": rows})


async def handle_detail(request: web.Request) -> web.Response:
    _require_api_key(request)
    row = _state(request).detail(request.match_info["session_id"])
    if row is None:
        raise ApiError(404, 4040, "session not found")
    return _ok(row)


# -- pipeline ----------------------------------------------------------------------


def _fault_response(fault: Fault) -> web.Response:
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
    if fault.raw_body is not None:
        return web.Response(status=fault.reply_status(), text=fault.raw_body, headers=headers)
    return envelope(fault.reply_status(), fault.reply_code(), fault.reply_message(), None, headers)


def _drop_connection(request: web.Request) -> web.Response:
    transport = request.transport
    if transport is not None:
        transport.close()
    # Never sent: the transport is closed, aiohttp drops it quietly.
    return web.Response(status=500)


async def _peek_stop(request: web.Request) -> tuple[str, Any] | None:
    """The session id and reason a stop names, if its body says (for stop_calls)."""
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(body, dict) and isinstance(body.get("session_id"), str):
        return body["session_id"], body.get("reason")
    return None


async def _run_endpoint(
    request: web.Request, handler: Handler, endpoint: str, state: SimulatorState
) -> tuple[web.StreamResponse, bool]:
    """Run one vendor request through faults, latency and the handler.

    Returns the response and whether the connection was dropped on purpose.
    """
    # Read the whole body first, like a real server before it acts: a client
    # that gives up during the latency below does not undo its request.
    await request.read()
    fault = state.take_fault(endpoint)
    delay = state.config.latency_for(endpoint) + (fault.delay_seconds if fault else 0.0)
    if delay > 0:
        await asyncio.sleep(delay)
    if fault is not None and fault.replaces_reply and not fault.after_create:
        if fault.disconnect:
            return _drop_connection(request), True
        return _fault_response(fault), False
    if state.roll_failure(endpoint):
        return envelope(500, 5000, "SESSION_ROOM_NOT_FOUND"), False
    try:
        response = await handler(request)
    except ApiError as exc:
        response = envelope(exc.status, exc.code, exc.message, None, exc.headers)
    if fault is not None and fault.after_create:
        if fault.disconnect:
            return _drop_connection(request), True
        return _fault_response(fault), False
    return response, False


def _endpoint_of(request: web.Request) -> str | None:
    name = request.match_info.route.name
    if name and name.startswith("deepbrain_"):
        endpoint = name.removeprefix("deepbrain_")
        if endpoint in ENDPOINTS:
            return endpoint
    return None


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    endpoint = _endpoint_of(request)
    state = _state(request)
    status: int | str = "cancelled"
    dropped = False
    stop_target: tuple[str, Any] | None = None
    if endpoint is not None:
        state.begin_request(endpoint)
    try:
        if endpoint == "stop":
            stop_target = await _peek_stop(request)
        if endpoint is not None:
            response, dropped = await _run_endpoint(request, handler, endpoint, state)
        else:
            response = await _other(request, handler)
        status = "dropped" if dropped else response.status
        return response
    except ConnectionError:
        status = "client_gone"  # the caller hung up before its body arrived
        raise
    except Exception:
        logger.exception("simulator error on %s %s", request.method, request.path)
        status = 500
        return envelope(500, 5000, "internal simulator error")
    finally:
        if endpoint is not None:
            state.end_request(endpoint, status)
        if stop_target is not None:
            state.record_stop_call(stop_target[0], stop_target[1], status)
        logger.info(
            "%s %s %s %.1fms",
            request.method,
            request.path,
            status,
            (time.perf_counter() - started) * 1000,
        )


async def _other(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admin routes and unmatched paths (404/405 in the matching error format)."""
    try:
        return await handler(request)
    except AdminError as exc:
        return web.json_response({"error": exc.message}, status=exc.status)
    except ApiError as exc:
        return envelope(exc.status, exc.code, exc.message, None, exc.headers)
    except web.HTTPException as exc:
        if request.path.startswith(ADMIN_PREFIX):
            return web.json_response({"error": exc.reason}, status=exc.status)
        code = 4040 if exc.status == 404 else 4000
        return envelope(exc.status, code, exc.reason, None)


# -- admin API -------------------------------------------------------------------------


async def _admin_body(request: web.Request, *, required: bool = True) -> Any:
    raw = await request.read()
    if not raw:
        if required:
            raise AdminError(400, "a JSON body is required")
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AdminError(400, "body is not valid JSON") from None


async def admin_sessions(request: web.Request) -> web.Response:
    status = request.query.get("status") or None
    if status not in (None, "active", "ended"):
        raise AdminError(400, "status must be active or ended")
    return web.json_response(_state(request).sessions(status))


async def admin_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    for session in _state(request).sessions():
        if session["session_id"] == session_id:
            return web.json_response(session)
    raise AdminError(404, "unknown session")


async def admin_end_session(request: web.Request) -> web.Response:
    body = await _admin_body(request, required=False)
    if not isinstance(body, dict):
        raise AdminError(400, "body must be a JSON object")
    reason = body.get("reason", "ERROR")
    if not isinstance(reason, str) or not reason:
        raise AdminError(400, "reason must be a non-empty string")
    session_id = request.match_info["session_id"]
    outcome = _state(request).end_session(session_id, reason, ended_by="admin")
    if outcome == "unknown":
        raise AdminError(404, "unknown session")
    if outcome == "ended":
        raise AdminError(409, "session already ended")
    return web.json_response({"session_id": session_id, "end_reason": reason})


async def admin_get_config(request: web.Request) -> web.Response:
    return web.json_response(_state(request).config.to_dict())


async def admin_config(request: web.Request) -> web.Response:
    body = await _admin_body(request)
    if not isinstance(body, dict):
        raise AdminError(400, "body must be a JSON object of settings")
    try:
        config = _state(request).configure(**body)
    except ValueError as exc:
        raise AdminError(400, str(exc)) from None
    return web.json_response(config.to_dict())


async def admin_get_faults(request: web.Request) -> web.Response:
    return web.json_response(_state(request).pending_faults())


async def admin_push_fault(request: web.Request) -> web.Response:
    body = await _admin_body(request)
    items = body if isinstance(body, list) else [body]
    state = _state(request)
    try:
        faults = [Fault.from_dict(item) for item in items if isinstance(item, dict)]
    except ValueError as exc:
        raise AdminError(400, str(exc)) from None
    if len(faults) != len(items) or not faults:
        raise AdminError(400, "body must be a fault object or a list of them")
    for fault in faults:
        state.push_fault(fault)
    return web.json_response(state.pending_faults())


async def admin_reset(request: web.Request) -> web.Response:
    body = await _admin_body(request, required=False)
    restore = isinstance(body, dict) and bool(body.get("config", False))
    _state(request).reset(restore_config=restore)
    return web.json_response({"reset": True, "config_restored": restore})


async def admin_revoke_tokens(request: web.Request) -> web.Response:
    generation = _state(request).revoke_tokens()
    return web.json_response({"revoked": True, "token_generation": generation})


async def admin_stats(request: web.Request) -> web.Response:
    return web.json_response(_state(request).stats())


def create_app(
    config: SimulatorConfig | None = None, *, state: SimulatorState | None = None
) -> web.Application:
    """The simulator as an aiohttp application (pass ``state`` to share one)."""
    app = web.Application(middlewares=[_middleware])
    app[STATE_KEY] = state if state is not None else SimulatorState(config)
    router = app.router
    router.add_post(f"{API_PREFIX}/token", handle_token, name="deepbrain_token")
    router.add_post(f"{API_PREFIX}/start", handle_start, name="deepbrain_start")
    router.add_post(f"{API_PREFIX}/stop", handle_stop, name="deepbrain_stop")
    router.add_post(f"{API_PREFIX}/{{session_id}}/ping", handle_ping, name="deepbrain_ping")
    router.add_post(f"{API_PREFIX}/{{session_id}}/talk", handle_talk, name="deepbrain_talk")
    router.add_get(API_PREFIX, handle_list, name="deepbrain_list", allow_head=False)
    router.add_get(
        f"{API_PREFIX}/{{session_id}}", handle_detail, name="deepbrain_detail", allow_head=False
    )
    router.add_get(f"{ADMIN_PREFIX}/sessions", admin_sessions, allow_head=False)
    router.add_get(f"{ADMIN_PREFIX}/sessions/{{session_id}}", admin_session, allow_head=False)
    router.add_post(f"{ADMIN_PREFIX}/sessions/{{session_id}}/end", admin_end_session)
    router.add_get(f"{ADMIN_PREFIX}/config", admin_get_config, allow_head=False)
    router.add_post(f"{ADMIN_PREFIX}/config", admin_config)
    router.add_get(f"{ADMIN_PREFIX}/faults", admin_get_faults, allow_head=False)
    router.add_post(f"{ADMIN_PREFIX}/faults", admin_push_fault)
    router.add_post(f"{ADMIN_PREFIX}/reset", admin_reset)
    router.add_post(f"{ADMIN_PREFIX}/revoke_tokens", admin_revoke_tokens)
    router.add_get(f"{ADMIN_PREFIX}/stats", admin_stats, allow_head=False)
    return app
