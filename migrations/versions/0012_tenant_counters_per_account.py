"""tenant counters per (tenant, account): a claim of a tenant without a maximum takes no
tenant-wide lock

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 12:00:00.000000

docs/admission.md ("The lock scheme", "Tenants") is the design.

0009 kept one ``tenant_usage`` row per tenant, updated by the statement triggers on
``sessions`` and locked ``FOR UPDATE`` by every claim and admission of that tenant; in a
pool of many accounts serving one tenant every start waited there, whatever its account.
This moves the counters to one row per (tenant, account):

- ``tenant_account_usage``: ``in_use``, ``waiting`` and the decayed ``used_seconds`` (as of
  ``used_at``) of one tenant on one account (``''``: waiting requests bound to none). The
  triggers (0009's, their function replaced) update the rows of the accounts a statement
  touched, in (tenant, account) order after the accounts' own rows; a claim already holds
  its account's row, so its tenant's row on that account adds no wait.
- ``tenant_totals``: the view of one row per tenant, the sums over its accounts, with
  ``used_seconds`` decayed to ``now()`` (``used_at`` = ``now()``). O(accounts) to read.
- ``orchestrator_claim(…, p_keep_reservations boolean)`` (0010's signature, body replaced):
  only a tenant with a maximum (or, when it would wait, a waiting cap) is locked, by its
  policy row in ``tenants`` (``FOR UPDATE``, after the account's row), and its live sessions
  are then summed over the accounts. Every path that raises a capped tenant's count (this
  claim, ``admit``) takes that lock; ends only lower it.
- ``tenant_counts`` (the counters beside a recount) reads ``tenant_totals``.

The counts are carried over: a recount of the rows, and each tenant's decayed
``used_seconds`` on its ``''`` row. ``tenant_usage`` stays (the release that reads it, if any
ran, finds the table) but is no longer kept: its rows are emptied. The releases this schema
serves (from 0004, v0.1.0) know no tenants; the function bodies changed here are listed in
``REMOVES``.
"""

from collections.abc import Sequence
from importlib import import_module

import sqlalchemy as sa
from alembic import op

from orchestrator.db.compatibility import declare, withdraw

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = "'starting', 'active', 'stopping'"
USAGE_WINDOW_SECONDS = 3600  # the decay of used_seconds (0009's)
NO_ACCOUNT = ""  # the account of a waiting request bound to none
SIGNATURE = (  # as the catalog prints it
    "orchestrator_claim(uuid,text,text,text,jsonb,text,jsonb,integer,integer,text,text,jsonb,"
    "text,text,double precision,integer,boolean) -> record"
)
WHY = "no release this schema serves (v0.1.0 at 0004 on) knows tenants"
REMOVES = {
    f"function {SIGNATURE}": f"{WHY}; same arguments and result, counters per account",
    "function orchestrator_count_tenants() -> trigger": f"{WHY}; counts per (tenant, account)",
    "function orchestrator_zero_tenants() -> trigger": f"{WHY}; zeroes the new counters",
    "view tenant_counts": f"{WHY}; the same columns, read from tenant_totals",
}

BUMP = f"""
CREATE FUNCTION orchestrator_bump_tenant_account(
    p_tenant text, p_account text, p_live integer, p_waiting integer, p_seconds double precision
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO tenant_account_usage AS u (tenant, account, in_use, waiting, used_seconds, used_at)
    VALUES (p_tenant, p_account, p_live, p_waiting, p_seconds, now())
    ON CONFLICT (tenant, account) DO UPDATE
       SET in_use = u.in_use + EXCLUDED.in_use, waiting = u.waiting + EXCLUDED.waiting,
           used_seconds = CASE WHEN EXCLUDED.used_seconds = 0 THEN u.used_seconds
               ELSE u.used_seconds * exp(-greatest(0, extract(epoch FROM now() - u.used_at))
                                         / {USAGE_WINDOW_SECONDS})
                    + EXCLUDED.used_seconds END,
           used_at = CASE WHEN EXCLUDED.used_seconds = 0 THEN u.used_at
                          ELSE greatest(u.used_at, now()) END
$$
"""  # noqa: S608 - built from this module's constants, no input

# 0009's function, keyed by (tenant, account) instead of tenant.
COUNT = f"""
CREATE OR REPLACE FUNCTION orchestrator_count_tenants() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    d record;
BEGIN
    IF TG_OP = 'INSERT' THEN
        FOR d IN SELECT n.tenant, coalesce(n.account, '{NO_ACCOUNT}') AS account,
                        count(*) FILTER (WHERE n.status IN ({LIVE}))::integer AS live,
                        count(*) FILTER (WHERE n.status = 'waiting')::integer AS waiting
                   FROM new_rows n GROUP BY 1, 2 ORDER BY 1, 2 LOOP
            IF d.live <> 0 OR d.waiting <> 0 THEN
                PERFORM orchestrator_bump_tenant_account(d.tenant, d.account, d.live, d.waiting, 0);
            END IF;
        END LOOP;
    ELSIF TG_OP = 'DELETE' THEN
        FOR d IN SELECT o.tenant, coalesce(o.account, '{NO_ACCOUNT}') AS account,
                        count(*) FILTER (WHERE o.status IN ({LIVE}))::integer AS live,
                        count(*) FILTER (WHERE o.status = 'waiting')::integer AS waiting
                   FROM old_rows o GROUP BY 1, 2 ORDER BY 1, 2 LOOP
            IF d.live <> 0 OR d.waiting <> 0 THEN
                PERFORM orchestrator_bump_tenant_account(
                    d.tenant, d.account, -d.live, -d.waiting, 0);
            END IF;
        END LOOP;
    ELSE
        FOR d IN SELECT c.tenant, c.account, sum(c.live)::integer AS live,
                        sum(c.waiting)::integer AS waiting,
                        sum(c.seconds)::float8 AS seconds
                   FROM (SELECT n.tenant, coalesce(n.account, '{NO_ACCOUNT}') AS account,
                                (n.status IN ({LIVE}))::integer AS live,
                                (n.status = 'waiting')::integer AS waiting,
                                0::float8 AS seconds FROM new_rows n
                         UNION ALL
                         SELECT o.tenant, coalesce(o.account, '{NO_ACCOUNT}'),
                                -(o.status IN ({LIVE}))::integer,
                                -(o.status = 'waiting')::integer,
                                CASE WHEN o.status IN ({LIVE}) AND n.status NOT IN ({LIVE})
                                     THEN greatest(0, extract(epoch FROM clock_timestamp()
                                         - coalesce(o.admitted_at, o.start_sent_at,
                                                    o.created_at)))
                                     ELSE 0 END
                           FROM old_rows o JOIN new_rows n ON n.id = o.id) AS c
                  GROUP BY 1, 2 ORDER BY 1, 2 LOOP
            IF d.live <> 0 OR d.waiting <> 0 OR d.seconds <> 0 THEN
                PERFORM orchestrator_bump_tenant_account(
                    d.tenant, d.account, d.live, d.waiting, d.seconds);
            END IF;
        END LOOP;
    END IF;
    RETURN NULL;
END
$$
"""  # noqa: S608 - built from this module's constants, no input

ZERO = """
CREATE OR REPLACE FUNCTION orchestrator_zero_tenants() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tenant_account_usage SET in_use = 0, waiting = 0 WHERE in_use <> 0 OR waiting <> 0;
    RETURN NULL;
END
$$
"""

TOTALS = f"""
CREATE VIEW tenant_totals AS
SELECT u.tenant AS name, sum(u.in_use)::integer AS in_use, sum(u.waiting)::integer AS waiting,
       sum(u.used_seconds * exp(-greatest(0, extract(epoch FROM now() - u.used_at))
                                / {USAGE_WINDOW_SECONDS}))::float8 AS used_seconds,
       now() AS used_at
  FROM tenant_account_usage u GROUP BY u.tenant
"""  # noqa: S608 - built from this module's constants, no input

COUNTED = f"""
CREATE OR REPLACE VIEW tenant_counts AS
SELECT u.name, u.in_use, u.waiting,
       coalesce(c.live, 0)::integer AS counted_in_use,
       coalesce(c.waiting, 0)::integer AS counted_waiting
  FROM tenant_totals u
  LEFT JOIN (SELECT tenant,
                    count(*) FILTER (WHERE status IN ({LIVE})) AS live,
                    count(*) FILTER (WHERE status = 'waiting') AS waiting
               FROM sessions WHERE status IN ({LIVE}, 'waiting')
              GROUP BY tenant) AS c ON c.tenant = u.name
"""  # noqa: S608 - built from this module's constants, no input

# The live and waiting rows recounted per (tenant, account); each tenant's decayed
# session-seconds carried to its '' row.
CARRY = f"""
INSERT INTO tenant_account_usage (tenant, account, in_use, waiting)
SELECT tenant, coalesce(account, '{NO_ACCOUNT}'),
       count(*) FILTER (WHERE status IN ({LIVE})), count(*) FILTER (WHERE status = 'waiting')
  FROM sessions WHERE status IN ({LIVE}, 'waiting')
 GROUP BY 1, 2;
INSERT INTO tenant_account_usage AS u (tenant, account, used_seconds, used_at)
SELECT name, '{NO_ACCOUNT}', used_seconds, used_at FROM tenant_usage WHERE used_seconds > 0
ON CONFLICT (tenant, account) DO UPDATE
   SET used_seconds = EXCLUDED.used_seconds, used_at = EXCLUDED.used_at;
DELETE FROM tenant_usage;
"""  # noqa: S608 - built from this module's constants, no input

# Down: tenant_usage refilled from the new counters (a recount and the decayed seconds).
CARRY_BACK = """
INSERT INTO tenant_usage (name, in_use, waiting, used_seconds, used_at)
SELECT name, in_use, waiting, used_seconds, used_at FROM tenant_totals
ON CONFLICT (name) DO UPDATE SET in_use = EXCLUDED.in_use, waiting = EXCLUDED.waiting,
    used_seconds = EXCLUDED.used_seconds, used_at = EXCLUDED.used_at
"""

DEFAULT_TENANT = "default"
# Raised and caught inside the claim: "this account does not take the request", which rolls
# back the subtransaction and so releases the account's (and the tenant's) row lock.
NOT_HERE = "OC001"

OPEN = """a.in_catalog AND a.enabled AND NOT a.draining
           AND (a.circuit_open_until IS NULL OR a.circuit_open_until <= clock_timestamp())"""
ELIGIBLE = """(p_account IS NULL OR a.name = p_account)
           AND (p_labels IS NULL OR a.labels @> p_labels)"""
FREE = "(a.effective_cap IS NULL OR a.in_use < a.effective_cap)"

# Is tenant t (a column reference) at its maximum? Read without locks (as 0009).
AT_MAXIMUM = """EXISTS (
    SELECT FROM tenants p JOIN tenant_totals u ON u.name = p.name
     WHERE p.name = {t} AND p.maximum IS NOT NULL AND u.in_use >= p.maximum)"""

# The pool's free slots, the unfilled reservations of every tenant and of p_tenant, and the
# tenants with one, reservations shrunk as effective_guarantees shrinks them when the open
# capacity is below the sum of guarantees (floor(reserved * capacity / sum of guarantees)).
RESERVATIONS = f"""
    WITH pool AS (
        SELECT coalesce(sum(a.effective_cap), 0) AS capacity,
               coalesce(sum(greatest(0, a.effective_cap - a.in_use)), 0) AS free,
               coalesce(bool_or(a.effective_cap IS NULL), false) AS unbounded
          FROM vendor_accounts a WHERE {OPEN}),
    wanted AS (SELECT coalesce(sum(p.guaranteed), 0) AS total FROM tenants p),
    holes AS (
        SELECT p.name, greatest(0, CASE WHEN w.total <= pool.capacity THEN p.reserved
                                        ELSE (p.reserved * pool.capacity / w.total)::integer
                                   END - coalesce(u.in_use, 0)) AS hole
          FROM tenants p CROSS JOIN pool CROSS JOIN wanted w
          LEFT JOIN tenant_totals u ON u.name = p.name
         WHERE p.reserved > 0)
    SELECT pool.unbounded, pool.free,
           coalesce((SELECT sum(h.hole) FROM holes h), 0)::integer,
           coalesce((SELECT sum(h.hole) FROM holes h WHERE h.name = p_tenant), 0)::integer,
           coalesce((SELECT array_agg(h.name) FROM holes h WHERE h.hole > 0), '{{}}')
      INTO pool_unbounded, pool_free, all_unfilled, own_unfilled, unfilled_tenants
      FROM pool"""  # noqa: S608 - built from this module's constants, no input

CLAIM = f"""
CREATE OR REPLACE FUNCTION orchestrator_claim(
    p_id uuid, p_request_id text, p_claim_id text, p_avatar_id text, p_payload jsonb,
    p_digest text, p_metadata jsonb, p_max_duration_seconds integer,
    p_start_deadline_seconds integer, p_traceparent text, p_account text, p_labels jsonb,
    p_tenant text, p_attempt_owner text, p_lease_seconds double precision,
    p_lock_timeout_ms integer, p_keep_reservations boolean,
    OUT session_id uuid, OUT status text, OUT account text, OUT cap integer,
    OUT live integer, OUT free_elsewhere boolean, OUT cancelled boolean, OUT at timestamptz,
    OUT refused text
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    starting boolean;
    ranked text[];
    passed_over text[];
    candidate text;
    locked_name text;
    locked_cap integer;
    locked_live integer;
    locked_labels jsonb;
    tenant_live integer;
    tenant_waiting integer;
    tenant_maximum integer;
    tenant_max_waiting integer;
    tenant_full boolean;
    reservations boolean;
    pool_unbounded boolean;
    pool_free integer;
    all_unfilled integer;
    own_unfilled integer;
    unfilled_tenants text[];
    kept boolean := false;
    lock_timeout_before text := current_setting('lock_timeout');
BEGIN
    p_labels := nullif(p_labels, 'null'::jsonb);  -- JSON null: no labels asked for
    p_tenant := coalesce(p_tenant, '{DEFAULT_TENANT}');
    PERFORM set_config('synchronous_commit', 'off', true);  -- as 0007
    PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
    PERFORM pg_advisory_xact_lock(hashtextextended('request:' || p_request_id, 0));
    IF (p_account IS NULL OR p_account = 'default') AND EXISTS (
        SELECT FROM vendor_accounts a WHERE a.name = 'default' AND a.in_catalog
           AND (p_labels IS NULL OR a.labels @> p_labels)) THEN
        PERFORM pg_advisory_xact_lock(6182161);  -- ADMISSION_LOCK_KEY (store/admission.py)
    END IF;
    cancelled := EXISTS (SELECT FROM early_stops e WHERE e.request_id = p_request_id);
    IF cancelled THEN
        at := clock_timestamp();
        RETURN;
    END IF;
    IF EXISTS (SELECT FROM sessions s WHERE s.request_id = p_request_id) THEN
        at := clock_timestamp();
        RETURN;  -- a redelivery or a duplicate: the caller reads the row (no account locked)
    END IF;
    SELECT p.maximum, p.max_waiting INTO tenant_maximum, tenant_max_waiting
      FROM tenants p WHERE p.name = p_tenant;
    tenant_full := tenant_maximum IS NOT NULL AND coalesce((SELECT sum(x.in_use)
        FROM tenant_account_usage x WHERE x.tenant = p_tenant), 0) >= tenant_maximum;
    reservations := p_keep_reservations AND EXISTS (SELECT FROM tenants p WHERE p.reserved > 0);
    -- Rank without locks; lock, re-check and take one account at a time: first passing over
    -- the accounts another decision holds (SKIP LOCKED), then, if every one was held (or
    -- none took the request), waiting for those passed over, in rank order.
    SELECT array_agg(r.name ORDER BY r.share DESC, r.name) INTO ranked FROM (
        SELECT a.name,
               a.weight * CASE WHEN coalesce(a.effective_cap, 0) = 0 THEN 1.0
                               ELSE (a.effective_cap - a.in_use)::float8 / a.effective_cap
                          END AS share
          FROM vendor_accounts a
         WHERE NOT tenant_full AND {OPEN}
           AND {ELIGIBLE}
           AND {FREE}) AS r;
    free_elsewhere := ranked IS NOT NULL;
    FOR sweep IN 1..2 LOOP
        passed_over := '{{}}';
        FOREACH candidate IN ARRAY coalesce(ranked, '{{}}') LOOP
            BEGIN
                locked_name := NULL;
                IF sweep = 1 THEN
                    SELECT a.name, a.effective_cap, a.in_use, a.labels
                      INTO locked_name, locked_cap, locked_live, locked_labels
                      FROM vendor_accounts a
                     WHERE a.name = candidate AND {OPEN}
                       AND {ELIGIBLE}
                     FOR UPDATE SKIP LOCKED;
                    IF locked_name IS NULL THEN
                        passed_over := passed_over || candidate;  -- held, or closed meanwhile
                    END IF;
                ELSE
                    SELECT a.name, a.effective_cap, a.in_use, a.labels
                      INTO locked_name, locked_cap, locked_live, locked_labels
                      FROM vendor_accounts a
                     WHERE a.name = candidate AND {OPEN}
                       AND {ELIGIBLE}
                     FOR UPDATE;
                END IF;
                IF locked_name IS NULL
                   OR NOT (locked_cap IS NULL OR locked_live < locked_cap) THEN
                    RAISE EXCEPTION USING ERRCODE = '{NOT_HERE}';
                END IF;
                -- A tenant with a maximum: its policy row, after the account's, then its live
                -- sessions summed over the accounts (the maximum holds across accounts). A
                -- tenant without one takes no tenant-wide lock: its counters are per account.
                IF tenant_maximum IS NOT NULL THEN
                    SELECT p.maximum INTO tenant_maximum FROM tenants p
                     WHERE p.name = p_tenant FOR UPDATE;
                    SELECT coalesce(sum(x.in_use), 0) INTO tenant_live
                      FROM tenant_account_usage x WHERE x.tenant = p_tenant;
                END IF;
                IF tenant_maximum IS NOT NULL AND tenant_live >= tenant_maximum THEN
                    tenant_full := true;  -- PL/pgSQL variables survive the rollback below
                    RAISE EXCEPTION USING ERRCODE = '{NOT_HERE}';
                END IF;
                -- The reservations: a slot taken now by a tenant without an unfilled one of its
                -- own must leave the pool enough free slots for every unfilled one.
                IF reservations THEN
                    {RESERVATIONS};
                    kept := NOT pool_unbounded AND pool_free - 1 < all_unfilled;
                    IF kept AND own_unfilled = 0 THEN
                        RAISE EXCEPTION USING ERRCODE = '{NOT_HERE}';
                    END IF;
                END IF;
                -- Rule 4: no waiting request this account could serve first (one whose tenant is
                -- at its maximum could not, nor one the reservations keep out of the free slots).
                IF EXISTS (
                       SELECT FROM sessions w
                        WHERE w.status = 'waiting'
                          AND (w.account = locked_name
                               OR (w.account IS NULL
                                   AND (w.requested_labels IS NULL
                                        OR locked_labels @> w.requested_labels)))
                          AND NOT {AT_MAXIMUM.format(t="w.tenant")}
                          AND NOT (kept AND NOT w.tenant = ANY(unfilled_tenants))) THEN
                    RAISE EXCEPTION USING ERRCODE = '{NOT_HERE}';
                END IF;
                account := locked_name;
                cap := locked_cap;
                live := locked_live;
            EXCEPTION WHEN SQLSTATE '{NOT_HERE}' THEN
                NULL;  -- the subtransaction's end released this account's and the tenant's rows
            END;
            EXIT WHEN account IS NOT NULL OR tenant_full;
        END LOOP;
        EXIT WHEN account IS NOT NULL OR tenant_full;
        ranked := passed_over;
    END LOOP;
    starting := account IS NOT NULL;
    IF NOT starting THEN
        -- The waiting row's counters: the named account's row (its trigger bumps it), then
        -- the tenant's, in the order of the lock scheme.
        IF p_account IS NOT NULL THEN
            PERFORM FROM vendor_accounts a WHERE a.name = p_account FOR UPDATE;
        END IF;
        IF tenant_maximum IS NOT NULL OR tenant_max_waiting IS NOT NULL THEN
            SELECT p.maximum, p.max_waiting INTO tenant_maximum, tenant_max_waiting
              FROM tenants p WHERE p.name = p_tenant FOR UPDATE;
            SELECT coalesce(sum(x.in_use), 0), coalesce(sum(x.waiting), 0)
              INTO tenant_live, tenant_waiting
              FROM tenant_account_usage x WHERE x.tenant = p_tenant;
        END IF;
        tenant_full := tenant_maximum IS NOT NULL AND tenant_live >= tenant_maximum;
    END IF;
    PERFORM set_config('lock_timeout', lock_timeout_before, true);
    at := clock_timestamp();  -- after the waits: the lease runs from the decision
    IF NOT starting AND tenant_max_waiting IS NOT NULL
       AND tenant_waiting >= tenant_max_waiting THEN
        refused := format('tenant %s already has %s request(s) waiting, its cap (max_waiting)',
                          p_tenant, tenant_waiting);
        RETURN;  -- the caller records the request as failed (or finds its row)
    END IF;
    free_elsewhere := NOT starting AND NOT tenant_full AND coalesce(free_elsewhere, false);
    IF NOT starting THEN
        account := p_account;
    END IF;
    status := CASE WHEN starting THEN 'starting' ELSE 'waiting' END;
    INSERT INTO sessions AS s (
        id, request_id, claim_id, status, avatar_id, request_payload, payload_sha256,
        metadata, max_duration_seconds, start_deadline_at, traceparent, created_at,
        attempts, start_sent_at, admitted_at, attempt_owner, attempt_lease_until,
        stop_attempts, account, requested_account, requested_labels, tenant)
    VALUES (
        p_id, p_request_id, p_claim_id, status, p_avatar_id, p_payload, p_digest,
        p_metadata, p_max_duration_seconds,
        at + make_interval(secs => p_start_deadline_seconds), p_traceparent, at,
        CASE WHEN starting THEN 1 ELSE 0 END, CASE WHEN starting THEN at END,
        CASE WHEN starting THEN at END, CASE WHEN starting THEN p_attempt_owner END,
        CASE WHEN starting THEN at + make_interval(secs => p_lease_seconds) END, 0,
        account, p_account, p_labels, p_tenant)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING s.id INTO session_id;
    IF session_id IS NOT NULL THEN
        INSERT INTO session_events (session_id, occurred_at, kind, detail)
        VALUES (session_id, at, 'created', jsonb_build_object(
            'claim_id', p_claim_id, 'status', status, 'account', account, 'live', live,
            'cap', cap, 'tenant', p_tenant));
    END IF;
END
$$
"""  # noqa: S608 - built from this module's constants, no input


def upgrade() -> None:
    op.create_table(
        "tenant_account_usage",
        sa.Column("tenant", sa.String(length=64), primary_key=True),
        sa.Column("account", sa.String(length=64), primary_key=True),
        sa.Column("in_use", sa.Integer(), server_default="0", nullable=False),
        sa.Column("waiting", sa.Integer(), server_default="0", nullable=False),
        sa.Column("used_seconds", sa.Float(), server_default="0", nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    # As 0009: writers wait from here to the recount, so no change slips between them.
    op.execute("LOCK TABLE sessions IN SHARE ROW EXCLUSIVE MODE")
    op.execute(BUMP)
    op.execute(COUNT)
    op.execute(ZERO)
    op.execute(CARRY)
    op.execute(TOTALS)
    op.execute(COUNTED)
    op.execute(CLAIM)
    declare(revision, down_revision, oldest_served="0004")  # no window change: 0011's value


def _restored(module: str, name: str) -> str:
    sql: str = getattr(import_module(f"orchestrator.migrations.versions.{module}"), name)
    return sql.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1).replace(
        "CREATE VIEW", "CREATE OR REPLACE VIEW", 1
    )


def downgrade() -> None:
    withdraw(revision)
    op.execute("LOCK TABLE sessions IN SHARE ROW EXCLUSIVE MODE")
    op.execute(_restored("0010_claim_one_account_at_a_time", "CLAIM"))
    op.execute(CARRY_BACK)
    op.execute(_restored("0009_tenants", "COUNTED"))
    op.execute(_restored("0009_tenants", "ZERO"))
    op.execute(_restored("0009_tenants", "COUNT"))
    op.execute("DROP VIEW tenant_totals")
    op.execute(
        "DROP FUNCTION orchestrator_bump_tenant_account(text, text, integer, integer,"
        " double precision)"
    )
    op.drop_table("tenant_account_usage")
