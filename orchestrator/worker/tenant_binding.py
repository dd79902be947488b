"""The tenant a start message may claim, as the broker vouches for it
(``ORCHESTRATOR_TENANT_FROM_USER_ID``, docs/admission.md "Tenants").

RabbitMQ refuses a message whose ``user_id`` property is not the publishing connection's user,
so ``user_id`` names who published it. A retry this worker publishes carries the tenant in a
header and its own broker user as ``user_id``: the header is believed only on a message whose
``user_id`` is this worker's own user (nobody without the worker's credentials can send one).
"""

from __future__ import annotations

from typing import Any

from kombu import Connection

from orchestrator.config import Settings

TENANT_HEADER = "orchestrator_tenant"


def broker_user(settings: Settings) -> str | None:
    """The user this process connects to the broker as (none: not AMQP)."""
    url = settings.effective_broker_url
    if not url.startswith(("amqp", "pyamqp")):
        return None
    user = Connection(url).userid  # parsed only: no connection is made
    return str(user) if user else "guest"


def vouched_tenant(request: Any, settings: Settings) -> str | None:
    """The broker user who published this delivery (its checked ``user_id`` property), or,
    on this worker's own retry, the tenant it carries; none if the message has no user_id."""
    properties = getattr(request, "properties", None) or {}
    user = properties.get("user_id") if isinstance(properties, dict) else None
    if not isinstance(user, str) or not user:
        return None
    carried = getattr(request, TENANT_HEADER, None)
    if user == broker_user(settings) and isinstance(carried, str) and carried:
        return carried
    return user


def retry_carry(request: Any, settings: Settings | None) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, properties) a retry of this delivery needs to keep its vouched tenant."""
    if settings is None or not settings.tenant_from_user_id:
        return {}, {}
    tenant = vouched_tenant(request, settings)
    own = broker_user(settings)
    if tenant is None or own is None:
        return {}, {}
    return {TENANT_HEADER: tenant}, {"user_id": own}
