"""tenants: policies, per-tenant counters kept by a trigger, the request's tenant on the row,
a claim that enforces a tenant's maximum and its waiting cap

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 07:00:00.000000

docs/admission.md ("Tenants") is the design; this is its schema.

- ``tenants``: one policy per configured tenant (``guaranteed``, ``maximum``, ``weight``,
  ``reserved``, ``max_waiting``), set with ``orchestrator tenants set``; a tenant without a
  row has the default policy (no guarantee, no maximum, weight 1, no waiting cap).
- ``tenant_usage``: per tenant, ``in_use`` (``starting`` + ``active`` + ``stopping`` across
  every account) and ``waiting``, exact, and ``used_seconds``, the session-seconds of its
  sessions that ended, decayed with a time constant of :data:`USAGE_WINDOW_SECONDS` as of
  ``used_at`` (fair sharing reads it). Kept by statement triggers on ``sessions`` in the same
  transaction as the change, as 0007's account counters; their names sort after 0007's, so
  in every statement the accounts' rows are locked before the tenants' (docs/admission.md,
  "The lock scheme": request, accounts by name, tenants by name). A TRUNCATE zeroes them;
  the view ``tenant_counts`` sets them beside a recount.
- ``sessions.tenant`` (existing rows and the previous release's inserts: ``default``) and a
  partial index of the waiting rows by tenant and age (a tenant's oldest waiting request).
- ``orchestrator_claim(…, p_labels jsonb, p_tenant text, …)``: 0007's claim with the tenant.
  After the accounts' rows it locks the tenant's usage row (created if missing); it admits
  only while the tenant holds fewer than its maximum, and a request that would wait while its
  tenant already has ``max_waiting`` waiting is not inserted: ``refused`` names the reason
  (the caller records a ``failed`` row). A waiting request of a tenant at its maximum does
  not hold back a younger request of another tenant. O(1) locks per claim; no global lock
  beyond 0007's (for ``default`` while the release at 0006 may run).

**Mixed fleet.** The release at 0007 (and those at 0004 to 0006) keep their own claim and know
nothing of tenants: their rows are ``default``'s, counted by the triggers, and a maximum set on
``default`` is not enforced by them until they are gone. Expand only: 0007's claim stays.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from orchestrator.db.compatibility import declare, withdraw

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_TENANT = "default"
LIVE = "'starting', 'active', 'stopping'"
USAGE_WINDOW_SECONDS = 3600  # the decay of used_seconds (docs/admission.md's window W)
CLAIM_SIGNATURE = (
    "orchestrator_claim(uuid, text, text, text, jsonb, text, jsonb, integer, integer, text,"
    " text, jsonb, text, text, double precision, integer)"
)

BUMP = f"""
CREATE FUNCTION orchestrator_bump_tenant(
    p_name text, p_live integer, p_waiting integer, p_seconds double precision
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO tenant_usage AS u (name, in_use, waiting, used_seconds, used_at)
    VALUES (p_name, p_live, p_waiting, p_seconds, now())
    ON CONFLICT (name) DO UPDATE
       SET in_use = u.in_use + EXCLUDED.in_use, waiting = u.waiting + EXCLUDED.waiting,
           used_seconds = CASE WHEN EXCLUDED.used_seconds = 0 THEN u.used_seconds
               ELSE u.used_seconds * exp(-greatest(0, extract(epoch FROM now() - u.used_at))
                                         / {USAGE_WINDOW_SECONDS})
                    + EXCLUDED.used_seconds END,
           used_at = CASE WHEN EXCLUDED.used_seconds = 0 THEN u.used_at
                          ELSE greatest(u.used_at, now()) END
$$
"""  # noqa: S608 - built from this module's constants, no input

# One function for the three statement triggers: each sees only its own transition tables.
# The seconds a session held its slot are charged when it leaves the live statuses.
COUNT = f"""
CREATE FUNCTION orchestrator_count_tenants() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    d record;
BEGIN
    IF TG_OP = 'INSERT' THEN
        FOR d IN SELECT n.tenant AS name,
                        count(*) FILTER (WHERE n.status IN ({LIVE}))::integer AS live,
                        count(*) FILTER (WHERE n.status = 'waiting')::integer AS waiting
                   FROM new_rows n GROUP BY n.tenant ORDER BY n.tenant LOOP
            IF d.live <> 0 OR d.waiting <> 0 THEN
                PERFORM orchestrator_bump_tenant(d.name, d.live, d.waiting, 0);
            END IF;
        END LOOP;
    ELSIF TG_OP = 'DELETE' THEN
        FOR d IN SELECT o.tenant AS name,
                        count(*) FILTER (WHERE o.status IN ({LIVE}))::integer AS live,
                        count(*) FILTER (WHERE o.status = 'waiting')::integer AS waiting
                   FROM old_rows o GROUP BY o.tenant ORDER BY o.tenant LOOP
            IF d.live <> 0 OR d.waiting <> 0 THEN
                PERFORM orchestrator_bump_tenant(d.name, -d.live, -d.waiting, 0);
            END IF;
        END LOOP;
    ELSE
        FOR d IN SELECT c.name, sum(c.live)::integer AS live,
                        sum(c.waiting)::integer AS waiting,
                        sum(c.seconds)::float8 AS seconds
                   FROM (SELECT n.tenant AS name, (n.status IN ({LIVE}))::integer AS live,
                                (n.status = 'waiting')::integer AS waiting,
                                0::float8 AS seconds FROM new_rows n
                         UNION ALL
                         SELECT o.tenant, -(o.status IN ({LIVE}))::integer,
                                -(o.status = 'waiting')::integer,
                                CASE WHEN o.status IN ({LIVE}) AND n.status NOT IN ({LIVE})
                                     THEN greatest(0, extract(epoch FROM clock_timestamp()
                                         - coalesce(o.admitted_at, o.start_sent_at,
                                                    o.created_at)))
                                     ELSE 0 END
                           FROM old_rows o JOIN new_rows n ON n.id = o.id) AS c
                  GROUP BY c.name ORDER BY c.name LOOP
            IF d.live <> 0 OR d.waiting <> 0 OR d.seconds <> 0 THEN
                PERFORM orchestrator_bump_tenant(d.name, d.live, d.waiting, d.seconds);
            END IF;
        END LOOP;
    END IF;
    RETURN NULL;
END
$$
"""  # noqa: S608 - built from this module's constants, no input

# Named after 0007's sessions_count_* so they fire after them: accounts, then tenants.
COUNT_TRIGGERS = (
    "CREATE TRIGGER sessions_tenants_count_insert AFTER INSERT ON sessions"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION orchestrator_count_tenants()",
    "CREATE TRIGGER sessions_tenants_count_update AFTER UPDATE ON sessions"
    " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION orchestrator_count_tenants()",
    "CREATE TRIGGER sessions_tenants_count_delete AFTER DELETE ON sessions"
    " REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION orchestrator_count_tenants()",
)

ZERO = """
CREATE FUNCTION orchestrator_zero_tenants() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tenant_usage SET in_use = 0, waiting = 0 WHERE in_use <> 0 OR waiting <> 0;
    RETURN NULL;
END
$$
"""

ZERO_TRIGGER = (
    "CREATE TRIGGER sessions_tenants_count_truncate AFTER TRUNCATE ON sessions"
    " FOR EACH STATEMENT EXECUTE FUNCTION orchestrator_zero_tenants()"
)

COUNTED = f"""
CREATE VIEW tenant_counts AS
SELECT u.name, u.in_use, u.waiting,
       coalesce(c.live, 0)::integer AS counted_in_use,
       coalesce(c.waiting, 0)::integer AS counted_waiting
  FROM tenant_usage u
  LEFT JOIN (SELECT tenant,
                    count(*) FILTER (WHERE status IN ({LIVE})) AS live,
                    count(*) FILTER (WHERE status = 'waiting') AS waiting
               FROM sessions WHERE status IN ({LIVE}, 'waiting')
              GROUP BY tenant) AS c ON c.tenant = u.name
"""  # noqa: S608 - built from this module's constants, no input

RECOUNT = f"""
INSERT INTO tenant_usage AS u (name, in_use, waiting)
SELECT tenant, count(*) FILTER (WHERE status IN ({LIVE})),
       count(*) FILTER (WHERE status = 'waiting')
  FROM sessions WHERE status IN ({LIVE}, 'waiting')
 GROUP BY tenant
ON CONFLICT (name) DO UPDATE SET in_use = EXCLUDED.in_use, waiting = EXCLUDED.waiting
"""  # noqa: S608 - built from this module's constants, no input

# Is tenant t (a column reference) at its maximum? Read without locks.
AT_MAXIMUM = """EXISTS (
    SELECT FROM tenants p JOIN tenant_usage u ON u.name = p.name
     WHERE p.name = {t} AND p.maximum IS NOT NULL AND u.in_use >= p.maximum)"""

CLAIM = f"""
CREATE FUNCTION orchestrator_claim(
    p_id uuid, p_request_id text, p_claim_id text, p_avatar_id text, p_payload jsonb,
    p_digest text, p_metadata jsonb, p_max_duration_seconds integer,
    p_start_deadline_seconds integer, p_traceparent text, p_account text, p_labels jsonb,
    p_tenant text, p_attempt_owner text, p_lease_seconds double precision,
    p_lock_timeout_ms integer,
    OUT session_id uuid, OUT status text, OUT account text, OUT cap integer,
    OUT live integer, OUT free_elsewhere boolean, OUT cancelled boolean, OUT at timestamptz,
    OUT refused text
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    starting boolean;
    open_names text[];
    tenant_live integer;
    tenant_waiting integer;
    tenant_maximum integer;
    tenant_max_waiting integer;
    tenant_full boolean;
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
    SELECT array_agg(l.name ORDER BY l.name) INTO open_names FROM (
        SELECT a.name FROM vendor_accounts a
         WHERE a.in_catalog AND a.enabled AND NOT a.draining
           AND (a.circuit_open_until IS NULL OR a.circuit_open_until <= clock_timestamp())
           AND (p_account IS NULL OR a.name = p_account)
           AND (p_labels IS NULL OR a.labels @> p_labels)
         ORDER BY a.name FOR UPDATE) AS l;
    -- The tenant's usage row, after the accounts' (its maximum holds across accounts).
    INSERT INTO tenant_usage (name) VALUES (p_tenant) ON CONFLICT (name) DO NOTHING;
    SELECT u.in_use, u.waiting INTO tenant_live, tenant_waiting
      FROM tenant_usage u WHERE u.name = p_tenant FOR UPDATE;
    PERFORM set_config('lock_timeout', lock_timeout_before, true);
    SELECT p.maximum, p.max_waiting INTO tenant_maximum, tenant_max_waiting
      FROM tenants p WHERE p.name = p_tenant;
    tenant_full := tenant_maximum IS NOT NULL AND tenant_live >= tenant_maximum;
    at := clock_timestamp();  -- after the waits: the lease runs from the decision
    cancelled := EXISTS (SELECT FROM early_stops e WHERE e.request_id = p_request_id);
    IF cancelled THEN
        RETURN;
    END IF;
    -- 0007's choice, for a tenant below its maximum; an older waiting request holds this one
    -- back only if its own tenant is below its maximum too.
    IF NOT tenant_full THEN
        SELECT a.name, a.effective_cap, a.in_use INTO account, cap, live
          FROM vendor_accounts a
         WHERE a.name = ANY(coalesce(open_names, '{{}}'))
           AND (a.effective_cap IS NULL OR a.in_use < a.effective_cap)
           AND NOT EXISTS (
               SELECT FROM sessions w
                WHERE w.status = 'waiting'
                  AND (w.account = a.name
                       OR (w.account IS NULL
                           AND (w.requested_labels IS NULL
                                OR a.labels @> w.requested_labels)))
                  AND NOT {AT_MAXIMUM.format(t="w.tenant")})
         ORDER BY a.weight * CASE WHEN coalesce(a.effective_cap, 0) = 0 THEN 1.0
                                  ELSE (a.effective_cap - a.in_use)::float8 / a.effective_cap
                             END DESC, a.name
         LIMIT 1;
    END IF;
    starting := account IS NOT NULL;
    IF NOT starting AND tenant_max_waiting IS NOT NULL
       AND tenant_waiting >= tenant_max_waiting THEN
        refused := format('tenant %s already has %s request(s) waiting, its cap (max_waiting)',
                          p_tenant, tenant_waiting);
        RETURN;  -- the caller records the request as failed (or finds its row)
    END IF;
    free_elsewhere := NOT starting AND NOT tenant_full AND EXISTS (
        SELECT FROM vendor_accounts a WHERE a.name = ANY(coalesce(open_names, '{{}}'))
           AND (a.effective_cap IS NULL OR a.in_use < a.effective_cap));
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


def tenant_table() -> tuple[sa.Column[object] | sa.CheckConstraint, ...]:
    return (
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("guaranteed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("maximum", sa.Integer()),
        sa.Column("weight", sa.Float(), server_default="1", nullable=False),
        sa.Column("reserved", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_waiting", sa.Integer()),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.CheckConstraint("guaranteed >= 0", name="tenants_guaranteed"),
        sa.CheckConstraint(
            "maximum IS NULL OR maximum >= greatest(guaranteed, 1)", name="tenants_maximum"
        ),
        sa.CheckConstraint("weight > 0", name="tenants_weight"),
        sa.CheckConstraint("reserved BETWEEN 0 AND guaranteed", name="tenants_reserved"),
        sa.CheckConstraint("max_waiting IS NULL OR max_waiting >= 0", name="tenants_waiting"),
    )


def upgrade() -> None:
    op.create_table("tenants", *tenant_table())
    op.create_table(
        "tenant_usage",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("in_use", sa.Integer(), server_default="0", nullable=False),
        sa.Column("waiting", sa.Integer(), server_default="0", nullable=False),
        sa.Column("used_seconds", sa.Float(), server_default="0", nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    op.add_column(
        "sessions",
        sa.Column("tenant", sa.String(length=64), server_default=DEFAULT_TENANT, nullable=False),
    )
    # As 0007: writers wait from here to the recount, so no change slips between them.
    op.execute("LOCK TABLE sessions IN SHARE ROW EXCLUSIVE MODE")
    op.create_index(
        "ix_sessions_waiting_tenant_created_at",
        "sessions",
        ["tenant", "created_at", "id"],
        postgresql_where=sa.text("status = 'waiting'"),
    )
    op.execute(BUMP)
    op.execute(COUNT)
    for trigger in COUNT_TRIGGERS:
        op.execute(trigger)
    op.execute(ZERO)
    op.execute(ZERO_TRIGGER)
    op.execute(RECOUNT)
    op.execute(COUNTED)
    op.execute(CLAIM)  # beside 0007's, which the release at 0007 calls
    declare(revision, down_revision, oldest_served="0004")  # an expansion: 0008's value


def downgrade() -> None:
    withdraw(revision)
    op.execute(f"DROP FUNCTION {CLAIM_SIGNATURE}")
    op.execute("DROP VIEW tenant_counts")
    op.execute("DROP TRIGGER sessions_tenants_count_truncate ON sessions")
    op.execute("DROP FUNCTION orchestrator_zero_tenants()")
    for name in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER sessions_tenants_count_{name} ON sessions")
    op.execute("DROP FUNCTION orchestrator_count_tenants()")
    op.execute("DROP FUNCTION orchestrator_bump_tenant(text, integer, integer, double precision)")
    op.drop_index("ix_sessions_waiting_tenant_created_at", table_name="sessions")
    op.drop_column("sessions", "tenant")
    op.drop_table("tenant_usage")
    op.drop_table("tenants")
