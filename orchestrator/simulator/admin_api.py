"""The simulator's own test/admin API under ``/_sim/`` (not part of DeepBrain)."""

from __future__ import annotations

from aiohttp import web

from orchestrator.simulator.faults import Fault
from orchestrator.simulator.http_common import AdminError, admin_body, state_of


async def admin_sessions(request: web.Request) -> web.Response:
    status = request.query.get("status") or None
    if status not in (None, "active", "ended"):
        raise AdminError(400, "status must be active or ended")
    account = request.query.get("account") or None
    return web.json_response(state_of(request).sessions(status, account))


async def admin_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    for session in state_of(request).sessions():
        if session["session_id"] == session_id:
            return web.json_response(session)
    raise AdminError(404, "unknown session")


async def admin_end_session(request: web.Request) -> web.Response:
    body = await admin_body(request, required=False)
    if not isinstance(body, dict):
        raise AdminError(400, "body must be a JSON object")
    reason = body.get("reason", "ERROR")
    if not isinstance(reason, str) or not reason:
        raise AdminError(400, "reason must be a non-empty string")
    session_id = request.match_info["session_id"]
    outcome = state_of(request).end_session(session_id, reason, ended_by="admin")
    if outcome == "unknown":
        raise AdminError(404, "unknown session")
    if outcome == "ended":
        raise AdminError(409, "session already ended")
    return web.json_response({"session_id": session_id, "end_reason": reason})


async def admin_get_config(request: web.Request) -> web.Response:
    return web.json_response(state_of(request).config.to_dict())


async def admin_config(request: web.Request) -> web.Response:
    body = await admin_body(request)
    if not isinstance(body, dict):
        raise AdminError(400, "body must be a JSON object of settings")
    try:
        config = state_of(request).configure(**body)
    except ValueError as exc:
        raise AdminError(400, str(exc)) from None
    return web.json_response(config.to_dict())


async def admin_get_faults(request: web.Request) -> web.Response:
    return web.json_response(state_of(request).pending_faults())


async def admin_push_fault(request: web.Request) -> web.Response:
    body = await admin_body(request)
    items = body if isinstance(body, list) else [body]
    state = state_of(request)
    try:
        faults = [Fault.from_dict(item) for item in items if isinstance(item, dict)]
        if len(faults) != len(items) or not faults:
            raise ValueError("body must be a fault object or a list of them")
        unknown = {f.account for f in faults if f.account and not state.config.account(f.account)}
        if unknown:
            raise ValueError(f"fault account(s) not served: {', '.join(sorted(unknown))}")
    except ValueError as exc:
        raise AdminError(400, str(exc)) from None
    for fault in faults:
        state.push_fault(fault)
    return web.json_response(state.pending_faults())


async def admin_reset(request: web.Request) -> web.Response:
    body = await admin_body(request, required=False)
    restore = isinstance(body, dict) and bool(body.get("config", False))
    state_of(request).reset(restore_config=restore)
    return web.json_response({"reset": True, "config_restored": restore})


async def admin_revoke_tokens(request: web.Request) -> web.Response:
    generation = state_of(request).revoke_tokens()
    return web.json_response({"revoked": True, "token_generation": generation})


async def admin_stats(request: web.Request) -> web.Response:
    return web.json_response(state_of(request).stats())


async def admin_accounts(request: web.Request) -> web.Response:
    """Every account served, with its settings and live count."""
    state = state_of(request)
    out = []
    for account in state.accounts():
        view = account.to_dict()
        view["active"] = state.active_count(account.name)
        out.append(view)
    return web.json_response(out)


async def admin_configure_account(request: web.Request) -> web.Response:
    """Change one account's settings at run time (e.g. ``{"server_errors": true}``)."""
    body = await admin_body(request)
    if not isinstance(body, dict):
        raise AdminError(400, "body must be a JSON object of account settings")
    name = request.match_info["name"]
    state = state_of(request)
    if state.config.account(name) is None:
        raise AdminError(404, "unknown account")
    try:
        account = state.configure_account(name, **body)
    except ValueError as exc:
        raise AdminError(400, str(exc)) from None
    return web.json_response(account.to_dict())
