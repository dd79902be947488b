"""The request pipeline (an aiohttp middleware) every vendor request goes through.

Count it, find the caller's account (its appId, token or key), take a scripted fault if
one is queued for it, sleep the account's latency (``asyncio.sleep``, so hundreds of
requests can wait at once), answer 500 / 5000 if the account is set to fail every call,
then maybe fail at random; only then the endpoint's handler runs. A fault may then trickle
the reply's body or reset the connection in the middle of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from orchestrator.simulator import tokens
from orchestrator.simulator.endpoint_values import ENDPOINTS
from orchestrator.simulator.faults import Fault
from orchestrator.simulator.http_common import (
    ADMIN_PREFIX,
    CALLER_KEY,
    AdminError,
    ApiError,
    envelope,
    state_of,
)
from orchestrator.simulator.state import SimulatorState

logger = logging.getLogger("orchestrator.simulator")


def _caller_account(request: web.Request, endpoint: str, body: bytes) -> str | None:
    """The account the request names (unchecked: the handler authenticates it)."""
    state = state_of(request)
    if endpoint == "token":
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        app_id = parsed.get("appId") if isinstance(parsed, dict) else None
        account = state.account_with_app_id(app_id) if isinstance(app_id, str) else None
        return account.name if account is not None else None
    if endpoint in ("start", "ping", "talk"):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        name = tokens.unverified_account(token.strip())
        return name if name is not None and state.config.account(name) is not None else None
    key = request.headers.get("STUDIO-API-KEY")
    account = state.account_with_user_key(key) if key else None
    return account.name if account is not None else None


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
    body = await request.read()
    account = _caller_account(request, endpoint, body)
    if account is not None:
        request[CALLER_KEY] = account
    fault = state.take_fault(endpoint, account)
    delay = state.config.latency_for(endpoint, account) + (fault.delay_seconds if fault else 0.0)
    if delay > 0:
        await asyncio.sleep(delay)
    response, dropped = await _answer(
        request, handler, endpoint, state, account=account, fault=fault
    )
    if fault is not None and fault.shapes_body and not dropped:
        return await _send_shaped(request, response, fault)
    return response, dropped


async def _answer(
    request: web.Request,
    handler: Handler,
    endpoint: str,
    state: SimulatorState,
    *,
    account: str | None,
    fault: Fault | None,
) -> tuple[web.StreamResponse, bool]:
    if fault is not None and fault.replaces_reply and not fault.after_create:
        if fault.disconnect:
            return _drop_connection(request), True
        return _fault_response(fault), False
    if state.config.server_errors_for(account) or state.roll_failure(endpoint, account):
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


async def _send_shaped(
    request: web.Request, response: web.StreamResponse, fault: Fault
) -> tuple[web.StreamResponse, bool]:
    """Send ``response``'s body ``trickle_bytes`` at a time, ``trickle_interval_seconds``
    apart, its whole length announced (Content-Length) so the client waits for all of it;
    with ``reset_after_bytes``, reset the connection once that many bytes are out."""
    whole = response.body if isinstance(response, web.Response) else None
    body = bytes(whole) if isinstance(whole, bytes | bytearray) else b""
    stream = web.StreamResponse(status=response.status, headers=response.headers)
    stream.content_length = len(body)
    await stream.prepare(request)
    limit = len(body)
    if fault.reset_after_bytes is not None:
        limit = min(limit, fault.reset_after_bytes)
    step = fault.trickle_bytes or limit or 1
    sent = 0
    try:
        while sent < limit:
            if sent and fault.trickle_interval_seconds:
                await asyncio.sleep(fault.trickle_interval_seconds)
            piece = body[sent : min(sent + step, limit)]
            await stream.write(piece)
            sent += len(piece)
    except ConnectionError:  # the client gave up (its deadline): nothing more to send
        return stream, True
    if fault.reset_after_bytes is not None:
        _reset_connection(request)
        return stream, True
    await stream.write_eof()
    return stream, False


def _reset_connection(request: web.Request) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer or a middlebox does."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _endpoint_of(request: web.Request) -> str | None:
    name = request.match_info.route.name
    if name and name.startswith("deepbrain_"):
        endpoint = name.removeprefix("deepbrain_")
        if endpoint in ENDPOINTS:
            return endpoint
    return None


@web.middleware
async def vendor_pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    endpoint = _endpoint_of(request)
    state = state_of(request)
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
        caller: str | None = request.get(CALLER_KEY)
        if endpoint is not None:
            state.end_request(endpoint, status)
            if caller is not None:
                state.record_account_call(caller, endpoint, status)
        if stop_target is not None:
            state.record_stop_call(stop_target[0], stop_target[1], status, caller)
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
