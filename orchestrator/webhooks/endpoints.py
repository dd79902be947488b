"""What the CLI does to endpoints: add, list, rotate, disable, enable, replay. A new signing
secret is returned once, in plain text, for the receiver's configuration; it is stored only
encrypted."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text

from orchestrator.db import Database
from orchestrator.errors import OrchestratorError
from orchestrator.webhooks.addresses import AddressPolicy
from orchestrator.webhooks.disabling import ENDPOINT_DISABLED, disable
from orchestrator.webhooks.models import WebhookEndpoint, WebhookSecret
from orchestrator.webhooks.secrets import SecretBox, new_secret

EVENT_TYPES = (
    "session.active",
    "session.ended",
    "session.failed",
    ENDPOINT_DISABLED,
    "session.waiting",  # asked for only: a request's expected wait (docs/messages.md)
)
DEFAULT_EVENT_TYPES = ("session.active", "session.ended", "session.failed")


class UnknownEndpoint(OrchestratorError):
    shown_as = ""


@dataclass(frozen=True)
class Added:
    endpoint_id: uuid.UUID
    secret: str  # shown once


def add(
    db: Database,
    box: SecretBox,
    policy: AddressPolicy,
    url: str,
    *,
    event_types: Sequence[str] = DEFAULT_EVENT_TYPES,
    tenant: str | None = None,
    description: str | None = None,
) -> Added:
    policy.check_url(url)
    unknown = sorted(set(event_types) - set(EVENT_TYPES))
    if unknown or not event_types:
        raise ValueError(f"event types must be among {', '.join(EVENT_TYPES)}: {unknown}")
    secret = new_secret()
    endpoint = WebhookEndpoint(
        id=uuid.uuid4(),
        url=url,
        event_types=sorted(set(event_types)),
        tenant=tenant,
        description=description,
    )
    with db.transaction() as session:
        session.add(endpoint)
        session.flush()
        session.add(WebhookSecret(endpoint_id=endpoint.id, ciphertext=box.encrypt(secret)))
    return Added(endpoint.id, secret)


def listing(db: Database) -> list[dict[str, Any]]:
    """The admin view's rows (no secret)."""
    with db.transaction() as session:
        rows = session.execute(
            text("SELECT * FROM admin_webhook_endpoints ORDER BY created_at, id")
        ).mappings()
        return [dict(r) for r in rows]


def rotate(db: Database, box: SecretBox, endpoint_id: uuid.UUID, grace_seconds: float) -> str:
    """A new secret; the live ones keep signing for ``grace_seconds`` (both signatures are
    sent meanwhile). Returns the new secret, once."""
    secret = new_secret()
    with db.transaction() as session:
        _exists(session, endpoint_id)
        session.execute(
            text(
                "UPDATE webhook_secrets SET expires_at = now() + make_interval(secs => :grace)"
                " WHERE endpoint_id = :e AND (expires_at IS NULL"
                "   OR expires_at > now() + make_interval(secs => :grace))"
            ),
            {"e": endpoint_id, "grace": grace_seconds},
        )
        session.add(WebhookSecret(endpoint_id=endpoint_id, ciphertext=box.encrypt(secret)))
    return secret


def set_disabled(db: Database, endpoint_id: uuid.UUID) -> bool:
    with db.transaction() as session:
        _exists(session, endpoint_id)
        return disable(session, endpoint_id, "operator")


def enable(db: Database, endpoint_id: uuid.UUID) -> None:
    """Enabled again, its failing clock reset; what was given up comes back by ``replay``."""
    with db.transaction() as session:
        _exists(session, endpoint_id)
        session.execute(
            text(
                "UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL,"
                " failing_since = NULL WHERE id = :e"
            ),
            {"e": endpoint_id},
        )


_REPLAY = text(
    """
INSERT INTO webhook_deliveries (endpoint_id, outbox_id, webhook_id, event_type, order_key)
SELECT e.id, o.id, o.event_id::text, o.routing_key, o.body->>'request_id'
  FROM event_outbox o JOIN webhook_endpoints e
    ON e.disabled_at IS NULL AND o.routing_key = ANY(e.event_types)
   AND (e.tenant IS NULL OR e.tenant = o.body->>'tenant')
 WHERE (CAST(:endpoint AS uuid) IS NULL OR e.id = :endpoint)
   AND (CAST(:event_id AS uuid) IS NULL OR o.event_id = :event_id)
   AND (CAST(:since AS timestamptz) IS NULL OR o.created_at >= :since)
   AND (CAST(:until AS timestamptz) IS NULL OR o.created_at < :until)
ON CONFLICT (endpoint_id, outbox_id) DO UPDATE
   SET status = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL,
       given_up_reason = NULL, lease_until = NULL, lease_owner = NULL
 WHERE webhook_deliveries.status <> 'pending'
RETURNING 1
"""
)


def replay(
    db: Database,
    *,
    event_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    endpoint_id: uuid.UUID | None = None,
) -> int:
    """Send again the events still in the outbox (retention: docs/operations.md) chosen by id
    or time range, to every enabled endpoint that takes them (or one); the same
    ``webhook-id`` as before. Returns how many deliveries were queued."""
    if event_id is None and since is None:
        raise ValueError("replay needs an event id or a start time")
    with db.transaction() as session:
        if endpoint_id is not None:
            _exists(session, endpoint_id)
        rows = session.execute(
            _REPLAY,
            {"endpoint": endpoint_id, "event_id": event_id, "since": since, "until": until},
        ).all()
    return len(rows)


def _exists(session: Any, endpoint_id: uuid.UUID) -> None:
    if session.get(WebhookEndpoint, endpoint_id) is None:
        raise UnknownEndpoint(f"no webhook endpoint {endpoint_id}")
