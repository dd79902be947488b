"""Which tenant a start belongs to: the message's ``tenant`` field, or, with
``ORCHESTRATOR_TENANT_FROM_USER_ID``, the broker user who published it (docs/admission.md
"Tenants"); a field naming another tenant, or no broker user, is refused with the reason."""

from __future__ import annotations

import re

from orchestrator.contract import TENANT_PATTERN
from orchestrator.store import DEFAULT_TENANT

_NAME = re.compile(TENANT_PATTERN)


def tenant_of(field: str | None, *, bound: bool, vouched: str | None) -> tuple[str, str | None]:
    """(tenant, why the start is refused or None)."""
    if not bound:
        return field or DEFAULT_TENANT, None
    if vouched is None:
        return DEFAULT_TENANT, (
            "the message has no user_id property, and ORCHESTRATOR_TENANT_FROM_USER_ID binds"
            " the tenant to it"
        )
    if not _NAME.fullmatch(vouched):
        return DEFAULT_TENANT, f"broker user {vouched!r} is not a tenant name"
    if field is not None and field != vouched:
        return vouched, (
            f"'tenant': {field!r}, but the message was published by broker user {vouched!r}"
        )
    return vouched, None
