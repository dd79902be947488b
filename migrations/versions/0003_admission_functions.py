"""admission in one statement: orchestrator_admission_state() and orchestrator_claim()

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 20:00:00.000000

Every admission decision holds one advisory lock. Taken from Python, the lock stayed held across
several round trips, and between them the worker thread that held it had to win the GIL back
from dozens of busy threads: the lock, not the work, limited starts to ~40/s (benchmarks P1,
pg_stat_activity showed 16 backends waiting on it). ``orchestrator_claim`` runs in autocommit
as one statement, so the lock is held only while the server runs it.

The claim commits asynchronously (``synchronous_commit`` off for its transaction alone): why
that loses nothing is written beside it.

The counts run under the lock, so they stop early: live sessions are counted up to the cap
(whether one more fits is all that matters) and waiting requests up to one (does anyone
wait?). A count of every live row cost 5 ms with 5,000 live rows (benchmarks P4).

It is VOLATILE PL/pgSQL on purpose: each statement inside takes a fresh snapshot, so the counts
read after the lock include every claim committed before it (a CTE would read a snapshot taken
before the lock was granted).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMISSION_STATE = """
CREATE FUNCTION orchestrator_admission_state(
    configured_cap integer, OUT cap integer, OUT live integer, OUT waiting integer
) LANGUAGE sql VOLATILE AS $$
    SELECT c.cap,
           (SELECT count(*) FROM (SELECT FROM sessions
                                   WHERE status IN ('starting', 'active', 'stopping')
                                   LIMIT c.cap) AS l)::integer,
           (SELECT count(*) FROM (SELECT FROM sessions WHERE status = 'waiting' LIMIT 1)
                                   AS w)::integer
      FROM (SELECT least(
                configured_cap,
                coalesce(nullif((SELECT max_session_numbers FROM sessions
                                  WHERE max_session_numbers IS NOT NULL
                                    AND started_at IS NOT NULL
                                  ORDER BY started_at DESC LIMIT 1), 0),
                         configured_cap)) AS cap) AS c
$$
"""

CLAIM = """
CREATE FUNCTION orchestrator_claim(
    p_id uuid, p_request_id text, p_claim_id text, p_avatar_id text, p_payload jsonb,
    p_digest text, p_metadata jsonb, p_max_duration_seconds integer,
    p_start_deadline_at timestamptz, p_traceparent text, p_now timestamptz,
    p_configured_cap integer,
    OUT session_id uuid, OUT status text, OUT cap integer, OUT live integer, OUT waiting integer
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    starting boolean;
BEGIN
    -- Commit without waiting for the WAL flush: the lock is released at commit, so the flush
    -- would serialise every claim behind the disk. Safe: nothing outside the database acts on
    -- a claim before a later synchronous commit that covers it (WAL is flushed in order), and
    -- a claim lost in a crash is claimed again from its unacknowledged message; a vendor
    -- session started meanwhile is stopped (compensation, or the reconciler's orphan sweep).
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(6182161);  -- store.ADMISSION_LOCK_KEY, 0x5E5511
    SELECT a.cap, a.live, a.waiting INTO cap, live, waiting
      FROM orchestrator_admission_state(p_configured_cap) AS a;
    starting := live < cap AND waiting = 0;
    status := CASE WHEN starting THEN 'starting' ELSE 'waiting' END;
    INSERT INTO sessions AS s (
        id, request_id, claim_id, status, avatar_id, request_payload, payload_sha256,
        metadata, max_duration_seconds, start_deadline_at, traceparent, created_at,
        attempts, start_sent_at, stop_attempts)
    VALUES (
        p_id, p_request_id, p_claim_id, status, p_avatar_id, p_payload, p_digest,
        p_metadata, p_max_duration_seconds, p_start_deadline_at, p_traceparent, p_now,
        CASE WHEN starting THEN 1 ELSE 0 END, CASE WHEN starting THEN p_now END, 0)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING s.id INTO session_id;
    IF session_id IS NOT NULL THEN
        INSERT INTO session_events (session_id, occurred_at, kind, detail)
        VALUES (session_id, p_now, 'created', jsonb_build_object(
            'claim_id', p_claim_id, 'status', status, 'live', live, 'cap', cap));
    END IF;
END
$$
"""


def upgrade() -> None:
    op.execute(ADMISSION_STATE)
    op.execute(CLAIM)


def downgrade() -> None:
    op.execute("DROP FUNCTION orchestrator_claim")
    op.execute("DROP FUNCTION orchestrator_admission_state")
