"""What every route of the simulator shares: the state key, the vendor's envelope and
error types, and JSON body parsing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from orchestrator.simulator.faults import DEFAULT_MESSAGES
from orchestrator.simulator.state import SimulatorState

STATE_KEY: Final = web.AppKey("simulator_state", SimulatorState)
#: ``request[CALLER_KEY]``: the account a vendor request comes from, as far as its appId,
#: token or key tell (set by the pipeline before faults and latency are chosen).
CALLER_KEY: Final = web.RequestKey("simulator_caller_account", str)

API_PREFIX: Final = "/api/v2/sessions"
ADMIN_PREFIX: Final = "/_sim"


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


def ok(data: Any, message: str = "success", status: int = 200) -> web.Response:
    return envelope(status, 1000, message, data)


def state_of(request: web.Request) -> SimulatorState:
    return request.app[STATE_KEY]


async def json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise ApiError(400, 4000, "request body must be a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, 4000, "request body is not valid JSON") from None


async def json_object(request: web.Request) -> dict[str, Any]:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, 4000, "request body must be a JSON object")
    return body


async def admin_body(request: web.Request, *, required: bool = True) -> Any:
    raw = await request.read()
    if not raw:
        if required:
            raise AdminError(400, "a JSON body is required")
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AdminError(400, "body is not valid JSON") from None
