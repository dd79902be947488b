"""The vendor endpoints: token, start, ping, talk, stop, list and detail.

Each answers the documented envelope ``{"code", "data", "message"}`` with the documented
HTTP statuses and codes, for the account the caller's appId, token or key belongs to: a
session of another account is "not found".
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from orchestrator.simulator.http_common import ApiError, json_object, ok, state_of

STOP_REASON_DEFAULT: Final = "USER_CLOSED"
REFUSED_MESSAGE: Final = "appId or userKey refused"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _require_bearer(request: web.Request) -> str:
    """The account of the request's session token (401 / 4010 if none is valid)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, 4010, "missing session token (Authorization: Bearer ...)")
    state = state_of(request)
    account = state.check_session_token(token.strip())
    if account is None:
        raise ApiError(401, 4010, "session token invalid or expired")
    if state.config.refuses_key_of(account):
        raise ApiError(401, 4010, REFUSED_MESSAGE)
    return account


def _require_api_key(request: web.Request) -> str:
    """The account of the ``STUDIO-API-KEY`` (401 / 4010 if it is none's or refused)."""
    key = request.headers.get("STUDIO-API-KEY")
    if not key:
        raise ApiError(401, 4010, "missing STUDIO-API-KEY header")
    state = state_of(request)
    account = state.account_with_user_key(key)
    if account is None:
        raise ApiError(401, 4010, "invalid STUDIO-API-KEY")
    if state.config.refuses_key_of(account.name):
        raise ApiError(401, 4010, REFUSED_MESSAGE)
    return account.name


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
    body = await json_object(request)
    app_id = _non_empty_string(body, "appId")
    user_key = _non_empty_string(body, "userKey")
    state = state_of(request)
    matched = None
    for account in state.config.account_list():
        # Evaluate both comparisons for every account: no short-circuit timing hint.
        app_ok = _same(app_id, account.app_id)
        key_ok = _same(user_key, account.user_key)
        if app_ok and key_ok:
            matched = account
    if matched is None:
        raise ApiError(401, 4010, "invalid appId or userKey")
    if state.config.refuses_key_of(matched.name):
        raise ApiError(401, 4010, REFUSED_MESSAGE)
    return ok({"session_token": state.mint_session_token(matched.name)})


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
    account = _require_bearer(request)
    body = await json_object(request)
    state = state_of(request)
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
        account=account,
    )
    limit = cfg.account(account)
    if session is None or limit is None:
        raise ApiError(cfg.limit_status, cfg.limit_code, cfg.limit_message)
    data: dict[str, Any] = {"session_id": session.session_id}
    if session.voice_id is not None:
        data["voice_id"] = session.voice_id
    data.update(
        {
            "max_session_duration": session.granted_minutes,
            "max_session_numbers": limit.max_concurrent_sessions,
            "livekit": {
                "url": session.livekit_url,
                "room_name": session.room_name,
                "token": session.livekit_token,
            },
        }
    )
    return ok(data, "Session has been started", cfg.start_http_status)


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
    account = _require_bearer(request)
    state = state_of(request)
    error = _session_outcome_error(state.touch(request.match_info["session_id"], "ping", account))
    if error is not None:
        raise error
    idle = state.config.idle_timeout_seconds
    return ok(
        {
            "idle_timeout_sec": _number(idle),
            "next_ping_recommended_sec": _number(None if idle is None else round(idle * 2 / 3, 3)),
        }
    )


async def handle_talk(request: web.Request) -> web.Response:
    account = _require_bearer(request)
    body = await json_object(request)
    _non_empty_string(body, "message")
    _optional_string(body, "type")
    session_id = request.match_info["session_id"]
    error = _session_outcome_error(state_of(request).touch(session_id, "talk", account))
    if error is not None:
        raise error
    return ok({"session_id": session_id})


async def handle_stop(request: web.Request) -> web.Response:
    account = _require_api_key(request)
    body = await json_object(request)
    session_id = _non_empty_string(body, "session_id")
    reason = body.get("reason", STOP_REASON_DEFAULT)
    if not isinstance(reason, str) or not reason:
        raise ApiError(400, 4000, "reason must be a non-empty string")
    outcome = state_of(request).end_session(session_id, reason, account=account)
    error = _session_outcome_error(outcome)
    if error is not None:
        raise error
    return ok({"session_id": session_id, "reason": reason}, "Session has been stopped")


def _int_query(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, 4000, f"{name} must be an integer") from None


async def handle_list(request: web.Request) -> web.Response:
    account = _require_api_key(request)
    state = state_of(request)
    page = _int_query(request, "page", 1)
    page_size = _int_query(request, "page_size", state.config.list_default_page_size)
    if page < 1:
        raise ApiError(400, 4000, "page must be >= 1")
    if not 1 <= page_size <= 100:
        raise ApiError(400, 4000, "page_size must be between 1 and 100")
    kind = request.query.get("type") or None
    if kind not in (None, "active", "historic"):
        raise ApiError(400, 4000, "type must be active or historic")
    count, rows = state.list_rows(kind, page, page_size, account)
    next_url = str(request.url.update_query(page=page + 1)) if page * page_size < count else None
    previous_url = str(request.url.update_query(page=page - 1)) if page > 1 else None
    return ok({"count": count, "next": next_url, "previous": previous_url, "results": rows})


async def handle_detail(request: web.Request) -> web.Response:
    account = _require_api_key(request)
    row = state_of(request).detail(request.match_info["session_id"], account)
    if row is None:
        raise ApiError(404, 4040, "session not found")
    return ok(row)
