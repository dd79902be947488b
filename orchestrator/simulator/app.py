"""The aiohttp application: the fake DeepBrain API plus the ``/_sim/`` admin API.

Vendor endpoints are in :mod:`~orchestrator.simulator.vendor_api`, the faults, latency and
accounting around them in :mod:`~orchestrator.simulator.pipeline`, the admin API in
:mod:`~orchestrator.simulator.admin_api`.
"""

from __future__ import annotations

from aiohttp import web

from orchestrator.simulator import admin_api, vendor_api
from orchestrator.simulator.config import SimulatorConfig
from orchestrator.simulator.http_common import (
    ADMIN_PREFIX,
    API_PREFIX,
    STATE_KEY,
    ApiError,
    envelope,
)
from orchestrator.simulator.pipeline import vendor_pipeline
from orchestrator.simulator.state import SimulatorState

__all__ = ["ApiError", "create_app", "envelope"]


def create_app(
    config: SimulatorConfig | None = None, *, state: SimulatorState | None = None
) -> web.Application:
    """The simulator as an aiohttp application (pass ``state`` to share one)."""
    app = web.Application(middlewares=[vendor_pipeline])
    app[STATE_KEY] = state if state is not None else SimulatorState(config)
    router = app.router
    vendor = vendor_api
    router.add_post(f"{API_PREFIX}/token", vendor.handle_token, name="deepbrain_token")
    router.add_post(f"{API_PREFIX}/start", vendor.handle_start, name="deepbrain_start")
    router.add_post(f"{API_PREFIX}/stop", vendor.handle_stop, name="deepbrain_stop")
    router.add_post(f"{API_PREFIX}/{{session_id}}/ping", vendor.handle_ping, name="deepbrain_ping")
    router.add_post(f"{API_PREFIX}/{{session_id}}/talk", vendor.handle_talk, name="deepbrain_talk")
    router.add_get(API_PREFIX, vendor.handle_list, name="deepbrain_list", allow_head=False)
    router.add_get(
        f"{API_PREFIX}/{{session_id}}",
        vendor.handle_detail,
        name="deepbrain_detail",
        allow_head=False,
    )
    admin = admin_api
    sim = ADMIN_PREFIX
    router.add_get(f"{sim}/sessions", admin.admin_sessions, allow_head=False)
    router.add_get(f"{sim}/sessions/{{session_id}}", admin.admin_session, allow_head=False)
    router.add_post(f"{sim}/sessions/{{session_id}}/end", admin.admin_end_session)
    router.add_get(f"{sim}/config", admin.admin_get_config, allow_head=False)
    router.add_post(f"{sim}/config", admin.admin_config)
    router.add_get(f"{sim}/accounts", admin.admin_accounts, allow_head=False)
    router.add_post(f"{sim}/accounts/{{name}}/config", admin.admin_configure_account)
    router.add_get(f"{sim}/faults", admin.admin_get_faults, allow_head=False)
    router.add_post(f"{sim}/faults", admin.admin_push_fault)
    router.add_post(f"{sim}/reset", admin.admin_reset)
    router.add_post(f"{sim}/revoke_tokens", admin.admin_revoke_tokens)
    router.add_get(f"{sim}/stats", admin.admin_stats, allow_head=False)
    return app
