"""The sender's reads and claims, all scheduled by the database's clock.

- :func:`fan_out`: outbox events not yet seen become one delivery per subscribed, enabled
  endpoint (its event type listed, its tenant filter matching ``data.tenant``), in the
  transaction that marks the events seen; the ``webhook_id`` is the event's ``event_id``, the
  same on every attempt and on the exchange, so a receiver de-duplicates on one key.
- :func:`claim_due`: due deliveries leased to this sender, never more than
  ``per_endpoint`` in flight for one endpoint, and never a session's event while an earlier
  one of that session to that endpoint is still pending (delivered or given up lets it go).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text

from orchestrator.db import Database

FAN_OUT_BATCH = 500
CLAIM_LOCK_KEY = 0x776862636C6D  # "whbclm": one claim at a time, so the bounds are exact
# One fan-out at a time, in id order and without SKIP LOCKED: a row skipped while the relay
# marks it published would let the session's next event become a delivery before it.
FAN_OUT_LOCK_KEY = 0x776862666E6F  # "whbfno"

_FAN_OUT = text(
    """
WITH events AS (
    SELECT o.id, o.event_id, o.routing_key, o.body FROM event_outbox o
     WHERE o.webhooks_fanned_at IS NULL
     ORDER BY o.id LIMIT :batch FOR UPDATE  -- in id order, as the relay's mark: no deadlock
), made AS (
    INSERT INTO webhook_deliveries (endpoint_id, outbox_id, webhook_id, event_type, order_key)
    SELECT e.id, ev.id, ev.event_id::text, ev.routing_key, ev.body->>'request_id'
      FROM events ev JOIN webhook_endpoints e
        ON e.disabled_at IS NULL AND ev.routing_key = ANY(e.event_types)
       AND (e.tenant IS NULL OR e.tenant = ev.body->>'tenant')
    ON CONFLICT (endpoint_id, outbox_id) DO NOTHING
    RETURNING 1
)
UPDATE event_outbox o SET webhooks_fanned_at = now()
  FROM events ev WHERE o.id = ev.id
RETURNING (SELECT count(*) FROM made)
"""
)

# Only endpoints with a free slot are looked at, and of each only as many due deliveries as
# it has free slots: a dead endpoint's backlog (its slots all held by attempts waiting out the
# timeout) costs nothing. The count of what is in flight reads the leased deliveries alone
# (migration 0013's index). Each open endpoint's due deliveries are walked in the order they
# are due (0013's (endpoint, next attempt) index, LIMIT its free slots, so the plan does not
# depend on the planner's guess of that endpoint's share of the table); a delivery is taken
# only if it heads its session's chain to that endpoint (no pending delivery of the same
# session with a lower outbox id: one probe of the pending-order index).
_CLAIM = text(
    """
WITH inflight AS MATERIALIZED (
    SELECT endpoint_id, count(*) AS n FROM webhook_deliveries
     WHERE status = 'pending' AND lease_until IS NOT NULL AND lease_until > now()
     GROUP BY endpoint_id
), open AS MATERIALIZED (
    SELECT e.id AS endpoint_id, :per_endpoint - coalesce(i.n, 0) AS free
      FROM webhook_endpoints e LEFT JOIN inflight i ON i.endpoint_id = e.id
     WHERE e.disabled_at IS NULL AND coalesce(i.n, 0) < :per_endpoint
), due AS (
    SELECT h.id, row_number() OVER (PARTITION BY h.endpoint_id
                                    ORDER BY h.next_attempt_at, h.outbox_id) AS rn
      FROM open o CROSS JOIN LATERAL (
          SELECT d.id, d.endpoint_id, d.next_attempt_at, d.outbox_id
            FROM webhook_deliveries d
           WHERE d.endpoint_id = o.endpoint_id AND d.status = 'pending'
             AND d.next_attempt_at <= now()
             AND (d.lease_until IS NULL OR d.lease_until <= now())
             AND (d.order_key IS NULL OR NOT EXISTS (
                 SELECT FROM webhook_deliveries p
                  WHERE p.endpoint_id = d.endpoint_id AND p.status = 'pending'
                    AND p.order_key = d.order_key AND p.outbox_id < d.outbox_id))
           ORDER BY d.next_attempt_at, d.outbox_id
           LIMIT o.free) AS h
), chosen AS (
    SELECT due.id FROM due ORDER BY due.rn, due.id LIMIT :limit
)
UPDATE webhook_deliveries d
   SET lease_until = now() + make_interval(secs => :lease), lease_owner = :owner
  FROM chosen WHERE d.id = chosen.id
RETURNING d.id
"""
)

_LOAD = text(
    """
SELECT d.id, d.webhook_id, d.event_type, d.attempts, d.endpoint_id, e.url,
       o.body, o.created_at, o.traceparent,
       array(SELECT k.ciphertext FROM webhook_secrets k
              WHERE k.endpoint_id = e.id AND (k.expires_at IS NULL OR k.expires_at > now())
              ORDER BY k.id DESC) AS ciphertexts
  FROM webhook_deliveries d
  JOIN webhook_endpoints e ON e.id = d.endpoint_id
  JOIN event_outbox o ON o.id = d.outbox_id
 WHERE d.id = ANY(:ids)
 ORDER BY d.id
"""
)


@dataclass(frozen=True)
class Claimed:
    """A leased delivery with what its attempt needs (secrets still encrypted)."""

    id: int
    webhook_id: str
    event_type: str
    attempts: int
    endpoint_id: uuid.UUID
    url: str
    body: dict[str, Any]
    created_at: datetime
    traceparent: str | None
    ciphertexts: tuple[str, ...]

    def __repr__(self) -> str:  # no body (a LiveKit token) and no secret in a log line
        return f"Claimed(id={self.id}, webhook_id={self.webhook_id!r}, event={self.event_type})"


def fan_out(db: Database, batch: int = FAN_OUT_BATCH) -> int:
    """Turn up to ``batch`` unseen events into deliveries; returns how many were made."""
    with db.transaction() as session:
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": FAN_OUT_LOCK_KEY})
        rows = session.execute(_FAN_OUT, {"batch": batch}).all()
    return int(rows[0][0]) if rows else 0


def claim_due(
    db: Database, owner: str, *, limit: int, per_endpoint: int, lease_seconds: float
) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries to ``owner`` (a lease that runs out, because its
    sender died, makes the delivery due again: at least once, same ``webhook_id``)."""
    if limit <= 0:
        return []
    with db.transaction() as session:
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CLAIM_LOCK_KEY})
        # psycopg prepares a statement after five runs, and Postgres may then keep one generic
        # plan for it, chosen on the statistics of that moment. Slow claims (30-45 ms, the
        # prepared one) came with the backlogs that built up in P6; a plan per claim, for the
        # table as it is now, costs ~1 ms of planning.
        session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        ids = list(
            session.execute(
                _CLAIM,
                {
                    "limit": limit,
                    "per_endpoint": per_endpoint,
                    "lease": lease_seconds,
                    "owner": owner,
                },
            ).scalars()
        )
        if not ids:
            return []
        rows = session.execute(_LOAD, {"ids": ids}).all()
    return [
        Claimed(
            id=r.id,
            webhook_id=r.webhook_id,
            event_type=r.event_type,
            attempts=r.attempts,
            endpoint_id=r.endpoint_id,
            url=r.url,
            body=r.body,
            created_at=r.created_at,
            traceparent=r.traceparent,
            ciphertexts=tuple(r.ciphertexts),
        )
        for r in rows
    ]
