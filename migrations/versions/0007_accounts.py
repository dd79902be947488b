"""accounts: per-account counters kept by a trigger, a claim that locks per account and per
request, the request's account wish on the row

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 06:30:00.000000

docs/admission.md is the design; this is its schema.

- ``vendor_accounts`` gains the state admission reads (one row per account): the cap the
  operator configured (synced from the account catalog), a cap lowered by the vendor's limit
  reply (``limited_cap``), ``effective_cap`` (a generated column: the lowest of the three
  caps, none if none is known), the exact counters ``in_use`` (``starting`` + ``active`` +
  ``stopping``) and ``waiting`` (requests waiting bound to the account), ``weight``,
  ``labels``, ``in_catalog``, ``enabled``, ``draining``, the circuit and the last error. No
  secret is ever stored here: keys stay in the catalog (environment or mounted Secret).
- ``sessions.account`` (existing rows: ``default``; a pool-wide request waits with none),
  ``requested_account`` / ``requested_labels`` (the request's wish), ``uncertain_at`` (the
  last start attempt that failed uncertainly: the request stays on its account until that
  account's list has been read since).
- Counter triggers (statement level, with transition tables): every INSERT, UPDATE and DELETE
  of ``sessions`` adjusts the counters of the accounts whose rows changed status or account,
  in the same transaction, locking the account rows in name order; a TRUNCATE zeroes them.
  A row that goes live without an account (the previous release admitting a pool-wide
  request) is given ``default`` by a row trigger before it is written. The counters are
  recounted here, under a lock that keeps writers out for the few milliseconds it takes.
- ``orchestrator_claim(…, p_account text, p_labels jsonb, …)``: the claim per account. It
  takes the request's lock (``hashtextextended('request:' || request_id, 0)``; a stop that
  finds no row takes the same), then the eligible open accounts' rows in name order, then
  admits to the one with the largest weighted free share where no older waiting request is
  eligible, else inserts the row ``waiting``. Every lock wait is bounded (``lock_timeout``,
  SQLSTATE 55P03 past it, as 0006); the lease is stamped with ``clock_timestamp()`` after the
  locks.

**Mixed fleet.** While a release before accounts still runs (heads 0004 to 0006: this
revision serves them, as 0006 did; docs/releases.md's previous release is at 0004), its
workers claim with their own function: one global advisory lock (6182161) and a count of
every live row against their cap. So a new claim that may admit to ``default`` (it is
among its eligible accounts) also takes that global lock, after the request lock, and a new
stop that finds no row takes it too: both releases then serialise on ``default`` and its cap holds
(the old count includes every account's rows, so it can only be stricter). A later contract
migration drops 0006's function and this global lock. Expand only: 0003/0004/0006's
functions and the 0006 trigger keep working (the trigger now records the limit on the row's
own account).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from orchestrator.db.compatibility import declare, withdraw

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_ACCOUNT = "default"
LIVE = "'starting', 'active', 'stopping'"
CLAIM_SIGNATURE = (
    "orchestrator_claim(uuid, text, text, text, jsonb, text, jsonb, integer, integer, text,"
    " text, jsonb, text, double precision, integer)"
)

# The account a live row without one belongs to: the previous release admits pool-wide rows.
BIND_DEFAULT = f"""
CREATE FUNCTION orchestrator_bind_default_account() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.account IS NULL AND NEW.status IN ({LIVE}) THEN
        NEW.account := '{DEFAULT_ACCOUNT}';
    END IF;
    RETURN NEW;
END
$$
"""

BIND_TRIGGER = """
CREATE TRIGGER sessions_bind_default_account BEFORE INSERT OR UPDATE OF status, account
ON sessions FOR EACH ROW EXECUTE FUNCTION orchestrator_bind_default_account()
"""

BUMP = """
CREATE FUNCTION orchestrator_bump_account(p_name text, p_live integer, p_waiting integer)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO vendor_accounts AS a (name, in_use, waiting) VALUES (p_name, p_live, p_waiting)
    ON CONFLICT (name) DO UPDATE
       SET in_use = a.in_use + EXCLUDED.in_use, waiting = a.waiting + EXCLUDED.waiting
$$
"""

# One function for the three statement triggers: each sees only its own transition tables.
COUNT = f"""
CREATE FUNCTION orchestrator_count_accounts() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    d record;
BEGIN
    IF TG_OP = 'INSERT' THEN
        FOR d IN SELECT n.account AS name,
                        count(*) FILTER (WHERE n.status IN ({LIVE}))::integer AS live,
                        count(*) FILTER (WHERE n.status = 'waiting')::integer AS waiting
                   FROM new_rows n WHERE n.account IS NOT NULL
                  GROUP BY n.account ORDER BY n.account LOOP
            IF d.live <> 0 OR d.waiting <> 0 THEN
                PERFORM orchestrator_bump_account(d.name, d.live, d.waiting);
            END IF;
        END LOOP;
    ELSIF TG_OP = 'DELETE' THEN
        FOR d IN SELECT o.account AS name,
                        count(*) FILTER (WHERE o.status IN ({LIVE}))::integer AS live,
                        count(*) FILTER (WHERE o.status = 'waiting')::integer AS waiting
                   FROM old_rows o WHERE o.account IS NOT NULL
                  GROUP BY o.account ORDER BY o.account LOOP
            IF d.live <> 0 OR d.waiting <> 0 THEN
                PERFORM orchestrator_bump_account(d.name, -d.live, -d.waiting);
            END IF;
        END LOOP;
    ELSE
        FOR d IN SELECT c.name, sum(c.live)::integer AS live, sum(c.waiting)::integer AS waiting
                   FROM (SELECT n.account AS name, (n.status IN ({LIVE}))::integer AS live,
                                (n.status = 'waiting')::integer AS waiting FROM new_rows n
                         UNION ALL
                         SELECT o.account, -(o.status IN ({LIVE}))::integer,
                                -(o.status = 'waiting')::integer FROM old_rows o) AS c
                  WHERE c.name IS NOT NULL
                  GROUP BY c.name ORDER BY c.name LOOP
            IF d.live <> 0 OR d.waiting <> 0 THEN
                PERFORM orchestrator_bump_account(d.name, d.live, d.waiting);
            END IF;
        END LOOP;
    END IF;
    RETURN NULL;
END
$$
"""  # noqa: S608 - built from this module's constants, no input

COUNT_TRIGGERS = (
    "CREATE TRIGGER sessions_count_insert AFTER INSERT ON sessions"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION orchestrator_count_accounts()",
    "CREATE TRIGGER sessions_count_update AFTER UPDATE ON sessions"
    " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION orchestrator_count_accounts()",
    "CREATE TRIGGER sessions_count_delete AFTER DELETE ON sessions"
    " REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION orchestrator_count_accounts()",
)

ZERO = """
CREATE FUNCTION orchestrator_zero_accounts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE vendor_accounts SET in_use = 0, waiting = 0 WHERE in_use <> 0 OR waiting <> 0;
    RETURN NULL;
END
$$
"""

ZERO_TRIGGER = (
    "CREATE TRIGGER sessions_count_truncate AFTER TRUNCATE ON sessions"
    " FOR EACH STATEMENT EXECUTE FUNCTION orchestrator_zero_accounts()"
)

# What the counters should be, from the rows (orchestrator accounts verify; the recount).
COUNTED = f"""
CREATE VIEW account_counts AS
SELECT a.name, a.in_use, a.waiting,
       coalesce(c.live, 0)::integer AS counted_in_use,
       coalesce(c.waiting, 0)::integer AS counted_waiting
  FROM vendor_accounts a
  LEFT JOIN (SELECT account,
                    count(*) FILTER (WHERE status IN ({LIVE})) AS live,
                    count(*) FILTER (WHERE status = 'waiting') AS waiting
               FROM sessions WHERE account IS NOT NULL AND status IN ({LIVE}, 'waiting')
              GROUP BY account) AS c ON c.account = a.name
"""  # noqa: S608 - built from this module's constants, no input

RECOUNT = f"""
INSERT INTO vendor_accounts AS a (name, in_use, waiting)
SELECT account, count(*) FILTER (WHERE status IN ({LIVE})),
       count(*) FILTER (WHERE status = 'waiting')
  FROM sessions WHERE account IS NOT NULL AND status IN ({LIVE}, 'waiting')
 GROUP BY account
ON CONFLICT (name) DO UPDATE SET in_use = EXCLUDED.in_use, waiting = EXCLUDED.waiting
"""  # noqa: S608 - built from this module's constants, no input

# 0006's trigger, pointed at a function that records the limit on the row's own account
# (0006's function stays as it was, unused, for a downgrade).
NOTE_ACCOUNT_LIMIT = f"""
CREATE FUNCTION orchestrator_note_account_limit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Only a change writes (and locks) the account's row: every start reports the limit.
    UPDATE vendor_accounts SET reported_limit = NEW.max_session_numbers, reported_at = now()
     WHERE name = coalesce(NEW.account, '{DEFAULT_ACCOUNT}')
       AND reported_limit IS DISTINCT FROM NEW.max_session_numbers;
    RETURN NULL;
END
$$
"""  # noqa: S608 - built from this module's constants, no input

NOTE_TRIGGER = (
    "CREATE TRIGGER sessions_vendor_limit AFTER INSERT OR UPDATE OF max_session_numbers"
    " ON sessions FOR EACH ROW WHEN (NEW.max_session_numbers IS NOT NULL)"
    " EXECUTE FUNCTION {function}()"
)

CLAIM = f"""
CREATE FUNCTION orchestrator_claim(
    p_id uuid, p_request_id text, p_claim_id text, p_avatar_id text, p_payload jsonb,
    p_digest text, p_metadata jsonb, p_max_duration_seconds integer,
    p_start_deadline_seconds integer, p_traceparent text, p_account text, p_labels jsonb,
    p_attempt_owner text, p_lease_seconds double precision, p_lock_timeout_ms integer,
    OUT session_id uuid, OUT status text, OUT account text, OUT cap integer,
    OUT live integer, OUT free_elsewhere boolean, OUT cancelled boolean, OUT at timestamptz
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    starting boolean;
    open_names text[];
    lock_timeout_before text := current_setting('lock_timeout');
BEGIN
    p_labels := nullif(p_labels, 'null'::jsonb);  -- JSON null: no labels asked for
    -- Commit without waiting for the WAL flush (as 0004): nothing is acknowledged on the
    -- strength of this commit alone.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- Every lock wait below is bounded: past it SQLSTATE 55P03, which the caller retries.
    PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
    -- The request's lock: a stop of this request that finds no row takes it too.
    PERFORM pg_advisory_xact_lock(hashtextextended('request:' || p_request_id, 0));
    -- Mixed fleet: the release at 0006 claims under one global lock with a global count; a
    -- claim that may admit to default serialises with it there.
    IF (p_account IS NULL OR p_account = '{DEFAULT_ACCOUNT}') AND EXISTS (
        SELECT FROM vendor_accounts a WHERE a.name = '{DEFAULT_ACCOUNT}' AND a.in_catalog
           AND (p_labels IS NULL OR a.labels @> p_labels)) THEN
        PERFORM pg_advisory_xact_lock(6182161);  -- ADMISSION_LOCK_KEY (store/admission.py)
    END IF;
    -- The eligible open accounts' rows, in name order (no deadlock between claims).
    SELECT array_agg(l.name ORDER BY l.name) INTO open_names FROM (
        SELECT a.name FROM vendor_accounts a
         WHERE a.in_catalog AND a.enabled AND NOT a.draining
           AND (a.circuit_open_until IS NULL OR a.circuit_open_until <= clock_timestamp())
           AND (p_account IS NULL OR a.name = p_account)
           AND (p_labels IS NULL OR a.labels @> p_labels)
         ORDER BY a.name FOR UPDATE) AS l;
    PERFORM set_config('lock_timeout', lock_timeout_before, true);
    at := clock_timestamp();  -- after the waits: the lease runs from the decision
    cancelled := EXISTS (SELECT FROM early_stops e WHERE e.request_id = p_request_id);
    IF cancelled THEN
        RETURN;  -- a stop came first: the caller records the request as ended
    END IF;
    -- The most weighted free share among the open eligible accounts with a free slot that no
    -- older waiting request could take (first in first out per eligible set), ties by name.
    SELECT a.name, a.effective_cap, a.in_use INTO account, cap, live
      FROM vendor_accounts a
     WHERE a.name = ANY(coalesce(open_names, '{{}}'))
       AND (a.effective_cap IS NULL OR a.in_use < a.effective_cap)
       AND NOT EXISTS (
           SELECT FROM sessions w
            WHERE w.status = 'waiting'
              AND (w.account = a.name
                   OR (w.account IS NULL
                       AND (w.requested_labels IS NULL OR a.labels @> w.requested_labels))))
     ORDER BY a.weight * CASE WHEN coalesce(a.effective_cap, 0) = 0 THEN 1.0
                              ELSE (a.effective_cap - a.in_use)::float8 / a.effective_cap END
              DESC, a.name
     LIMIT 1;
    starting := account IS NOT NULL;
    free_elsewhere := NOT starting AND EXISTS (
        SELECT FROM vendor_accounts a WHERE a.name = ANY(coalesce(open_names, '{{}}'))
           AND (a.effective_cap IS NULL OR a.in_use < a.effective_cap));
    IF NOT starting THEN
        account := p_account;  -- a named account binds the waiting row; else none yet
    END IF;
    status := CASE WHEN starting THEN 'starting' ELSE 'waiting' END;
    INSERT INTO sessions AS s (
        id, request_id, claim_id, status, avatar_id, request_payload, payload_sha256,
        metadata, max_duration_seconds, start_deadline_at, traceparent, created_at,
        attempts, start_sent_at, admitted_at, attempt_owner, attempt_lease_until,
        stop_attempts, account, requested_account, requested_labels)
    VALUES (
        p_id, p_request_id, p_claim_id, status, p_avatar_id, p_payload, p_digest,
        p_metadata, p_max_duration_seconds,
        at + make_interval(secs => p_start_deadline_seconds), p_traceparent, at,
        CASE WHEN starting THEN 1 ELSE 0 END, CASE WHEN starting THEN at END,
        CASE WHEN starting THEN at END, CASE WHEN starting THEN p_attempt_owner END,
        CASE WHEN starting THEN at + make_interval(secs => p_lease_seconds) END, 0,
        account, p_account, p_labels)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING s.id INTO session_id;
    IF session_id IS NOT NULL THEN
        INSERT INTO session_events (session_id, occurred_at, kind, detail)
        VALUES (session_id, at, 'created', jsonb_build_object(
            'claim_id', p_claim_id, 'status', status, 'account', account, 'live', live,
            'cap', cap));
    END IF;
END
$$
"""  # noqa: S608 - built from this module's constants, no input


def account_columns() -> tuple[sa.Column[object], ...]:
    """New each call: a Column belongs to the one Table alembic builds around it."""
    return (
        sa.Column("configured_cap", sa.Integer()),
        sa.Column("limited_cap", sa.Integer()),
        sa.Column(
            "effective_cap",
            sa.Integer(),
            sa.Computed("least(configured_cap, nullif(reported_limit, 0), limited_cap)"),
        ),
        sa.Column("in_use", sa.Integer(), server_default="0", nullable=False),
        sa.Column("waiting", sa.Integer(), server_default="0", nullable=False),
        sa.Column("weight", sa.Float(), server_default="1", nullable=False),
        sa.Column("labels", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("in_catalog", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("draining", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("disabled_reason", sa.String(length=200)),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("circuit_open_until", sa.DateTime(timezone=True)),
        sa.Column("circuit_cooldown_seconds", sa.Float()),
        sa.Column("last_error", sa.String(length=500)),
        sa.Column("last_error_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
    )


def session_columns() -> tuple[sa.Column[object], ...]:
    return (
        sa.Column("account", sa.String(length=64), server_default=DEFAULT_ACCOUNT),
        sa.Column("requested_account", sa.String(length=64)),
        sa.Column("requested_labels", postgresql.JSONB()),
        sa.Column("uncertain_at", sa.DateTime(timezone=True)),
    )


def upgrade() -> None:
    for column in account_columns():
        op.add_column("vendor_accounts", column)
    # The release before accounts served default alone: it is in the catalog until the
    # first worker of this release syncs the catalog.
    op.execute("UPDATE vendor_accounts SET in_catalog = true WHERE name = 'default'")
    for column in session_columns():
        op.add_column("sessions", column)  # a constant default: no table rewrite
    # Writers wait the few milliseconds from here to the recount, so no change slips between
    # the triggers' creation and the counts they continue from.
    op.execute("LOCK TABLE sessions IN SHARE ROW EXCLUSIVE MODE")
    op.execute(BIND_DEFAULT)
    op.execute(BIND_TRIGGER)
    op.execute(BUMP)
    op.execute(COUNT)
    for trigger in COUNT_TRIGGERS:
        op.execute(trigger)
    op.execute(ZERO)
    op.execute(ZERO_TRIGGER)
    op.execute(RECOUNT)
    op.execute(COUNTED)
    op.execute(NOTE_ACCOUNT_LIMIT)
    op.execute("DROP TRIGGER sessions_vendor_limit ON sessions")
    op.execute(NOTE_TRIGGER.format(function="orchestrator_note_account_limit"))
    op.execute(CLAIM)  # beside 0006's, which the release at 0006 calls
    declare(revision, down_revision, oldest_served="0004")  # an expansion: 0006's value


def downgrade() -> None:
    withdraw(revision)
    op.execute(f"DROP FUNCTION {CLAIM_SIGNATURE}")
    op.execute("DROP TRIGGER sessions_vendor_limit ON sessions")
    op.execute(NOTE_TRIGGER.format(function="orchestrator_note_vendor_limit"))
    op.execute("DROP FUNCTION orchestrator_note_account_limit()")
    op.execute("DROP VIEW account_counts")
    op.execute("DROP TRIGGER sessions_count_truncate ON sessions")
    op.execute("DROP FUNCTION orchestrator_zero_accounts()")
    for name in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER sessions_count_{name} ON sessions")
    op.execute("DROP FUNCTION orchestrator_count_accounts()")
    op.execute("DROP FUNCTION orchestrator_bump_account(text, integer, integer)")
    op.execute("DROP TRIGGER sessions_bind_default_account ON sessions")
    op.execute("DROP FUNCTION orchestrator_bind_default_account()")
    for column in reversed(session_columns()):
        op.drop_column("sessions", column.name)
    for column in reversed(account_columns()):
        op.drop_column("vendor_accounts", column.name)
