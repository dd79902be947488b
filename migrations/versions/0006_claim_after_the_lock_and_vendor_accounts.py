"""the claim's lease after the lock, a bounded lock wait, and the vendor's limit in one row

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 03:00:00.000000

- ``vendor_accounts``: one row per vendor account (today one, ``default``) holding the
  vendor's last reported concurrent-session limit (``max_session_numbers``). Admission read it
  from the newest started row that had one: when the vendor omits the field, that read walked
  every row ever started, under the admission lock. A trigger on ``sessions`` keeps the row
  current from every release's start record (the previous release's too); it writes only when
  the limit changes, so the usual start takes no lock on it.
- ``orchestrator_admission_state(integer, text)``: the counts of 0003, the vendor's limit read
  from the account's row (one row).
- ``orchestrator_claim(…, p_lock_timeout_ms integer)``: waits at most that long for the
  admission lock (``lock_timeout``; SQLSTATE 55P03 past it, which the caller retries), and
  takes every time from ``clock_timestamp()`` once the lock is held, so the attempt's lease
  starts when the claim decides, not when its statement began.

Expand only: 0003's ``orchestrator_admission_state(integer)`` and 0004's claim stay as they
are for the release at 0004/0005 (docs/operations.md, "Upgrades").
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from orchestrator.db.compatibility import declare, withdraw

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_ACCOUNT = "default"
CLAIM_SIGNATURE = (
    "orchestrator_claim(uuid, text, text, text, jsonb, text, jsonb, integer, integer, text,"
    " integer, text, double precision, integer)"
)
ADMISSION_STATE_SIGNATURE = "orchestrator_admission_state(integer, text)"

ADMISSION_STATE = """
CREATE FUNCTION orchestrator_admission_state(
    configured_cap integer, account text, OUT cap integer, OUT live integer, OUT waiting integer
) LANGUAGE sql VOLATILE AS $$
    SELECT c.cap,
           (SELECT count(*) FROM (SELECT FROM sessions
                                   WHERE status IN ('starting', 'active', 'stopping')
                                   LIMIT c.cap) AS l)::integer,
           (SELECT count(*) FROM (SELECT FROM sessions WHERE status = 'waiting' LIMIT 1)
                                   AS w)::integer
      FROM (SELECT least(
                configured_cap,
                coalesce(nullif((SELECT a.reported_limit FROM vendor_accounts a
                                  WHERE a.name = account), 0),
                         configured_cap)) AS cap) AS c
$$
"""

NOTE_VENDOR_LIMIT = """
CREATE FUNCTION orchestrator_note_vendor_limit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Only a change writes (and locks) the account's row: every start reports the limit.
    UPDATE vendor_accounts SET reported_limit = NEW.max_session_numbers, reported_at = now()
     WHERE name = 'default' AND reported_limit IS DISTINCT FROM NEW.max_session_numbers;
    RETURN NULL;
END
$$
"""

NOTE_TRIGGER = """
CREATE TRIGGER sessions_vendor_limit AFTER INSERT OR UPDATE OF max_session_numbers ON sessions
FOR EACH ROW WHEN (NEW.max_session_numbers IS NOT NULL)
EXECUTE FUNCTION orchestrator_note_vendor_limit()
"""

CLAIM = """
CREATE FUNCTION orchestrator_claim(
    p_id uuid, p_request_id text, p_claim_id text, p_avatar_id text, p_payload jsonb,
    p_digest text, p_metadata jsonb, p_max_duration_seconds integer,
    p_start_deadline_seconds integer, p_traceparent text, p_configured_cap integer,
    p_attempt_owner text, p_lease_seconds double precision, p_lock_timeout_ms integer,
    OUT session_id uuid, OUT status text, OUT cap integer, OUT live integer, OUT waiting integer,
    OUT cancelled boolean, OUT at timestamptz
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    starting boolean;
    lock_timeout_before text := current_setting('lock_timeout');
BEGIN
    -- Commit without waiting for the WAL flush: the lock is released at commit, so the flush
    -- would serialise every claim behind the disk. Nothing is acknowledged on the strength of
    -- this commit alone: a start is acknowledged after its record (a synchronous commit that
    -- flushes this one too), a waiting claim after an explicit flush by the caller.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- A bounded wait for the lock: past it SQLSTATE 55P03, an outage the caller retries.
    PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
    PERFORM pg_advisory_xact_lock(6182161);  -- ADMISSION_LOCK_KEY (store/admission.py)
    PERFORM set_config('lock_timeout', lock_timeout_before, true);
    at := clock_timestamp();  -- after the wait: the lease runs from the decision
    cancelled := EXISTS (SELECT FROM early_stops e WHERE e.request_id = p_request_id);
    IF cancelled THEN
        RETURN;  -- a stop came first: the caller records the request as ended
    END IF;
    SELECT a.cap, a.live, a.waiting INTO cap, live, waiting
      FROM orchestrator_admission_state(p_configured_cap, 'default') AS a;
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

# The newest limit a started row reported, as 0003's admission read it (none: no limit yet).
SEED = """
INSERT INTO vendor_accounts (name, reported_limit, reported_at)
SELECT 'default', latest.max_session_numbers, latest.started_at
  FROM (SELECT 1) AS one
  LEFT JOIN (SELECT max_session_numbers, started_at FROM sessions
              WHERE max_session_numbers IS NOT NULL AND started_at IS NOT NULL
              ORDER BY started_at DESC LIMIT 1) AS latest ON true
"""


def upgrade() -> None:
    op.create_table(
        "vendor_accounts",
        sa.Column("name", sa.String(length=64), server_default=DEFAULT_ACCOUNT, nullable=False),
        sa.Column("reported_limit", sa.Integer()),
        sa.Column("reported_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_vendor_accounts")),
    )
    op.execute(SEED)
    op.execute(NOTE_VENDOR_LIMIT)
    op.execute(NOTE_TRIGGER)
    op.execute(ADMISSION_STATE)
    op.execute(CLAIM)  # beside 0004's, which the release at 0004/0005 calls
    declare(revision, down_revision, oldest_served="0004")


def downgrade() -> None:
    withdraw(revision)
    op.execute(f"DROP FUNCTION {CLAIM_SIGNATURE}")
    op.execute(f"DROP FUNCTION {ADMISSION_STATE_SIGNATURE}")
    op.execute("DROP TRIGGER sessions_vendor_limit ON sessions")
    op.execute("DROP FUNCTION orchestrator_note_vendor_limit()")
    op.drop_table("vendor_accounts")
