"""Disabling an endpoint: the row marked (once), its pending deliveries given up, and an
``endpoint.disabled`` event written into the outbox in the same transaction (relayed to the
exchange and sent to endpoints that subscribe to it, like every event)."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session

from orchestrator.events.bodies import DATABASE_NOW_ISO, EVENT_VERSION

ENDPOINT_DISABLED = "endpoint.disabled"

_DISABLE = text(
    "UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = :reason"
    " WHERE id = :endpoint AND disabled_at IS NULL RETURNING failing_since"
)
_GIVE_UP_PENDING = text(
    "UPDATE webhook_deliveries SET status = 'given_up', given_up_reason = 'endpoint_disabled',"
    " finished_at = now(), lease_until = NULL, lease_owner = NULL"
    " WHERE endpoint_id = :endpoint AND status = 'pending'"
)
# Only constants are formatted in; the values are bound.
_EVENT = text(
    f"""
INSERT INTO event_outbox (event_id, routing_key, body, created_at)
VALUES (:event_id, :key, jsonb_build_object(
    'event_id', CAST(:event_id AS text), 'version', {EVENT_VERSION},
    'endpoint_id', CAST(:endpoint AS text), 'reason', CAST(:reason AS text),
    'failing_since', to_char(CAST(:failing_since AS timestamptz) AT TIME ZONE 'UTC',
                             'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
    'occurred_at', {DATABASE_NOW_ISO}), now())
"""  # noqa: S608
)


def disable(session: Session, endpoint_id: uuid.UUID, reason: str) -> bool:
    """Disable ``endpoint_id`` for ``reason`` (``gone``, ``failing``, ``operator``); False if
    it already was."""
    failing_since = session.execute(_DISABLE, {"endpoint": endpoint_id, "reason": reason}).first()
    if failing_since is None:
        return False
    session.execute(_GIVE_UP_PENDING, {"endpoint": endpoint_id})
    session.execute(
        _EVENT,
        {
            "event_id": uuid.uuid4(),
            "key": ENDPOINT_DISABLED,
            "endpoint": endpoint_id,
            "reason": reason,
            "failing_since": failing_since[0],
        },
    )
    return True
