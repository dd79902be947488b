"""leases and early stops: one vendor attempt at a time, stops that overtake their start,
one reconcile pass at a time, and one clock (the database's) for the claim

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 14:00:00.000000

- ``sessions.admitted_at``: when the row last went ``starting``; the start timeout runs from
  here (a request that waited long is not failed between its admission and its start).
- ``sessions.attempt_owner`` / ``attempt_lease_until``: the lease on the vendor attempt in
  progress. A redelivered start that finds a live lease waits for it instead of calling the
  vendor a second time.
- ``early_stops``: a stop that arrived before its start, remembered until the start comes.
- ``sweep_leases``: one reconcile pass at a time across the deployment.
- ``orchestrator_claim`` takes every time from the server's clock (``now()``), takes the
  attempt lease when it admits at once, and reports an early stop instead of inserting (the
  caller then records the request as ended, in one transaction with the early stop's removal).
  It is a new signature beside 0003's, which stays: the previous release's workers keep calling
  that one while this release rolls out (expand/contract, docs/operations.md). 0003's function
  still works on this schema: the columns added here are nullable, and a row it claims is read
  by this release like one claimed before the upgrade (no lease, the start timeout from
  ``start_sent_at``). A later contract migration may drop it.
"""

from collections.abc import Sequence
from importlib import import_module

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_CLAIM_SIGNATURE = (
    "orchestrator_claim(uuid, text, text, text, jsonb, text, jsonb, integer, timestamptz, text,"
    " timestamptz, integer)"
)
NEW_CLAIM_SIGNATURE = (
    "orchestrator_claim(uuid, text, text, text, jsonb, text, jsonb, integer, integer, text,"
    " integer, text, double precision)"
)

CLAIM = """
CREATE FUNCTION orchestrator_claim(
    p_id uuid, p_request_id text, p_claim_id text, p_avatar_id text, p_payload jsonb,
    p_digest text, p_metadata jsonb, p_max_duration_seconds integer,
    p_start_deadline_seconds integer, p_traceparent text, p_configured_cap integer,
    p_attempt_owner text, p_lease_seconds double precision,
    OUT session_id uuid, OUT status text, OUT cap integer, OUT live integer, OUT waiting integer,
    OUT cancelled boolean, OUT at timestamptz
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    starting boolean;
BEGIN
    -- Commit without waiting for the WAL flush: the lock is released at commit, so the flush
    -- would serialise every claim behind the disk. Nothing is acknowledged on the strength of
    -- this commit alone: a start is acknowledged after its record (a synchronous commit that
    -- flushes this one too), a waiting claim after an explicit flush by the caller.
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(6182161);  -- ADMISSION_LOCK_KEY (store/admission.py)
    at := now();
    cancelled := EXISTS (SELECT FROM early_stops e WHERE e.request_id = p_request_id);
    IF cancelled THEN
        RETURN;  -- a stop came first: the caller records the request as ended
    END IF;
    SELECT a.cap, a.live, a.waiting INTO cap, live, waiting
      FROM orchestrator_admission_state(p_configured_cap) AS a;
    starting := live < cap AND waiting = 0;
    status := CASE WHEN starting THEN 'starting' ELSE 'waiting' END;
    INSERT INTO sessions AS s (
        id, request_id, claim_id, status, avatar_id, request_payload, payload_sha256,
        metadata, max_duration_seconds, start_deadline_at, traceparent, created_at,
        attempts, start_sent_at, admitted_at, attempt_owner, attempt_lease_until,
        stop_attempts)
    VALUES (
        p_id, p_request_id, p_claim_id, status, p_avatar_id, p_payload, p_digest,
        p_metadata, p_max_duration_seconds,
        at + make_interval(secs => p_start_deadline_seconds), p_traceparent, at,
        CASE WHEN starting THEN 1 ELSE 0 END, CASE WHEN starting THEN at END,
        CASE WHEN starting THEN at END, CASE WHEN starting THEN p_attempt_owner END,
        CASE WHEN starting THEN at + make_interval(secs => p_lease_seconds) END, 0)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING s.id INTO session_id;
    IF session_id IS NOT NULL THEN
        INSERT INTO session_events (session_id, occurred_at, kind, detail)
        VALUES (session_id, at, 'created', jsonb_build_object(
            'claim_id', p_claim_id, 'status', status, 'live', live, 'cap', cap));
    END IF;
END
$$
"""


def upgrade() -> None:
    op.add_column("sessions", sa.Column("admitted_at", sa.DateTime(timezone=True)))
    op.add_column("sessions", sa.Column("attempt_owner", sa.String(length=64)))
    op.add_column("sessions", sa.Column("attempt_lease_until", sa.DateTime(timezone=True)))
    op.create_table(
        "early_stops",
        sa.Column("request_id", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column(
            "requested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_early_stops")),
    )
    op.create_table(
        "sweep_leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_sweep_leases")),
    )
    op.execute(CLAIM)  # beside 0003's OLD_CLAIM_SIGNATURE, which the previous release calls


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {NEW_CLAIM_SIGNATURE}")
    # A database upgraded by this migration before it kept 0003's function has none.
    op.execute(f"DROP FUNCTION IF EXISTS {OLD_CLAIM_SIGNATURE}")
    op.execute(import_module("orchestrator.migrations.versions.0003_admission_functions").CLAIM)
    op.drop_table("sweep_leases")
    op.drop_table("early_stops")
    op.drop_column("sessions", "attempt_lease_until")
    op.drop_column("sessions", "attempt_owner")
    op.drop_column("sessions", "admitted_at")
