"""Recording an attempt, in one transaction: the attempt row; the delivery delivered, given up
or scheduled again (``next_attempt_at`` from :mod:`.schedule`); the endpoint's failing clock.
A 410 disables the endpoint, and so does failing for ORCHESTRATOR_WEBHOOK_DISABLE_AFTER_SECONDS
(``failing_since``, cleared by any success). Disabling gives up the endpoint's pending
deliveries (``webhooks enable`` then ``webhooks replay`` brings them back within retention)
and writes an ``endpoint.disabled`` event into the outbox, in the same transaction.

Successes are recorded in groups, in one statement (:func:`record_successes`: the sender's
threads hand theirs to the one recording); a failure, rarer and with more to decide, in a
transaction of its own (:func:`record`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from orchestrator.db import Database
from orchestrator.webhooks.disabling import disable
from orchestrator.webhooks.models import ERROR_LENGTH
from orchestrator.webhooks.schedule import next_delay


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: a status code, or an error (no body: it is the receiver's)."""

    status_code: int | None
    duration_ms: int
    error: str | None = None
    retry_after: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


_ATTEMPT = text(
    "INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, duration_ms, error)"
    " VALUES (:id, now(), :code, :ms, :error)"
)
# A group of successes in one autocommitted statement (one round trip for the lot): their
# attempt rows, the deliveries delivered, their endpoints' failing clocks cleared (locked in id
# order: two senders clearing the same endpoints never deadlock). A delivery removed meanwhile
# (its endpoint removed) is skipped, not an error that would lose the others' records.
_SUCCESSES = text(
    """
WITH done AS (
    SELECT t.id, t.code, t.ms
      FROM unnest(CAST(:ids AS bigint[]), CAST(:codes AS integer[]), CAST(:ms AS integer[]))
           AS t(id, code, ms)
      JOIN webhook_deliveries d ON d.id = t.id
), attempt AS (
    INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, duration_ms, error)
    SELECT id, now(), code, ms, NULL FROM done
), delivered AS (
    UPDATE webhook_deliveries d
       SET status = 'delivered', attempts = d.attempts + 1, finished_at = now(),
           lease_until = NULL, lease_owner = NULL
      FROM done WHERE d.id = done.id AND d.status = 'pending'
), recovered AS (
    SELECT e.id FROM webhook_endpoints e
     WHERE e.id = ANY(CAST(:endpoints AS uuid[])) AND e.failing_since IS NOT NULL
     ORDER BY e.id FOR UPDATE
)
UPDATE webhook_endpoints e SET failing_since = NULL FROM recovered WHERE e.id = recovered.id
"""
)
_FAILED = text(
    "UPDATE webhook_deliveries SET attempts = attempts + 1 WHERE id = :id AND status = 'pending'"
    " RETURNING attempts"
)
_RETRY = text(
    "UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => :delay),"
    " lease_until = NULL, lease_owner = NULL WHERE id = :id"
)
_GIVE_UP = text(
    "UPDATE webhook_deliveries SET status = 'given_up', given_up_reason = :reason,"
    " finished_at = now(), lease_until = NULL, lease_owner = NULL WHERE id = :id"
)
_FAILING = text(
    "UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, now())"
    " WHERE id = :endpoint AND disabled_at IS NULL"
    " RETURNING failing_since <= now() - make_interval(secs => :after) AS overdue"
)


@dataclass(frozen=True)
class Success:
    """A 2xx answer to one delivery, still to be recorded."""

    delivery_id: int
    endpoint_id: uuid.UUID
    status_code: int
    duration_ms: int


def record_successes(db: Database, successes: Sequence[Success]) -> None:
    """Record ``successes`` whole (:data:`_SUCCESSES`), all or none: a sender that dies before
    this leaves them leased, and each is sent again, same ``webhook-id``, when its lease runs
    out (at least once)."""
    if not successes:
        return
    with db.autocommit() as connection:
        connection.execute(
            _SUCCESSES,
            {
                "ids": [s.delivery_id for s in successes],
                "codes": [s.status_code for s in successes],
                "ms": [s.duration_ms for s in successes],
                "endpoints": sorted({s.endpoint_id for s in successes}),
            },
        )


def record(
    db: Database,
    delivery_id: int,
    endpoint_id: uuid.UUID,
    outcome: Outcome,
    *,
    disable_after_seconds: float,
) -> None:
    """Record one attempt in a transaction of its own (a success as :func:`record_successes`)."""
    if outcome.delivered:
        assert outcome.status_code is not None
        success = Success(delivery_id, endpoint_id, outcome.status_code, outcome.duration_ms)
        record_successes(db, [success])
        return
    error = outcome.error[:ERROR_LENGTH] if outcome.error else None
    row = {"id": delivery_id, "code": outcome.status_code, "ms": outcome.duration_ms}
    with db.transaction() as session:
        session.execute(_ATTEMPT, {**row, "error": error})
        _failed(session, delivery_id, endpoint_id, outcome, disable_after_seconds)


def _failed(
    session: Session,
    delivery_id: int,
    endpoint_id: uuid.UUID,
    outcome: Outcome,
    disable_after_seconds: float,
) -> None:
    attempts = session.execute(_FAILED, {"id": delivery_id}).scalar()
    if attempts is not None:  # still pending (not delivered by a sender whose lease overlapped)
        delay = next_delay(attempts, outcome.retry_after)
        if delay is None:
            session.execute(_GIVE_UP, {"id": delivery_id, "reason": "retries_exhausted"})
        else:
            session.execute(_RETRY, {"id": delivery_id, "delay": delay})
    overdue = session.execute(
        _FAILING, {"endpoint": endpoint_id, "after": disable_after_seconds}
    ).scalar()
    if outcome.status_code == 410:
        disable(session, endpoint_id, "gone")
    elif overdue:
        disable(session, endpoint_id, "failing")
