"""The sender's claim does not read a dead endpoint's backlog while its slots are full: the
count of deliveries in flight reads the leased ones alone (migration 0013's index), so a claim
for the healthy endpoints costs the same beside 200 or 10,000 pending deliveries of the dead
one. Measured in shared buffers the claim statement touches (EXPLAIN ANALYZE), not in time."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import text

from orchestrator.db import Database
from orchestrator.webhooks.deliveries import _CLAIM

pytestmark = pytest.mark.postgres

PER_ENDPOINT = 16


def _endpoints(db: Database) -> tuple[uuid.UUID, uuid.UUID]:
    dead, healthy = uuid.uuid4(), uuid.uuid4()
    with db.transaction() as session:
        for endpoint, url in (
            (dead, "http://127.0.0.1:9/dead"),
            (healthy, "http://127.0.0.1:9/ok"),
        ):
            session.execute(
                text(
                    "INSERT INTO webhook_endpoints (id, url, event_types)"
                    " VALUES (:id, :url, ARRAY['session.active'])"
                ),
                {"id": endpoint, "url": url},
            )
    return dead, healthy


def _pending(db: Database, endpoint: uuid.UUID, count: int, *, leased: int = 0) -> None:
    """``count`` pending deliveries to ``endpoint`` (one session each), the first ``leased``
    of them in flight."""
    with db.transaction() as session:
        session.execute(
            text(
                "WITH events AS (INSERT INTO event_outbox (event_id, routing_key, body)"
                " SELECT gen_random_uuid(), 'session.active',"
                "        jsonb_build_object('request_id', 'cost-' || gen_random_uuid())"
                "   FROM generate_series(1, :n) RETURNING id, event_id, body)"
                " INSERT INTO webhook_deliveries"
                " (endpoint_id, outbox_id, webhook_id, event_type, order_key, lease_until,"
                "  lease_owner)"
                " SELECT :e, id, event_id::text, 'session.active', body->>'request_id',"
                "        CASE WHEN row_number() OVER (ORDER BY id) <= :leased"
                "             THEN now() + interval '1 hour' END,"
                "        CASE WHEN row_number() OVER (ORDER BY id) <= :leased THEN 'dead' END"
                "   FROM events"
            ),
            {"n": count, "e": endpoint, "leased": leased},
        )
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE webhook_deliveries"))


def _claim_buffers(db: Database) -> int:
    """Shared buffers one claim statement touches (rolled back: nothing is leased)."""
    with db.engine.connect() as connection:
        plan = connection.execute(
            text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + _CLAIM.text),
            {"limit": 4, "per_endpoint": PER_ENDPOINT, "lease": 30.0, "owner": "test"},
        ).scalar_one()
        connection.rollback()
    top = (plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


def test_a_dead_endpoints_backlog_does_not_make_every_claim_read_it(wdb: Database) -> None:
    dead, healthy = _endpoints(wdb)
    _pending(wdb, dead, 200, leased=PER_ENDPOINT)  # its slots all held
    _pending(wdb, healthy, 50)
    small = _claim_buffers(wdb)
    _pending(wdb, dead, 10_000)
    large = _claim_buffers(wdb)
    assert large < small * 1.5, (small, large)
