"""claim one account at a time: rank without locks, lock and re-check one account's row at a
time, keep the slots other tenants' reservations need

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 09:00:00.000000

docs/admission.md ("The lock scheme", "One decision", "Tenants") is the design.

``orchestrator_claim(…, p_tenant text, …, p_lock_timeout_ms integer,
p_keep_reservations boolean)``: 0009's claim with two changes.

- **One account's row at a time.** 0009 locked every open eligible account's row (in name
  order) before choosing, so claims that name no account queued behind each other on a pool
  of many accounts. This one ranks the open eligible accounts with a free slot by the routing
  rule from their counters read without locks, then for each in rank order locks that row
  alone (in a subtransaction), re-checks it (still open and eligible, ``in_use <
  effective_cap``, no waiting request it could serve first, the tenant below its maximum,
  the reservations below) and inserts the row ``starting`` there; a rejected account's lock
  (and the tenant's, taken after it) is released by ending the subtransaction before the next
  is tried. A claim never holds two accounts' rows, so the order it tries them in cannot
  deadlock with anything. Unnamed claims rank alike, so the first sweep locks with ``SKIP
  LOCKED`` (an account another decision holds is passed over for the next in rank); only if
  none took the request does a second sweep wait for those passed over, in rank order. If
  none takes it, the row is inserted ``waiting`` (the account it names, if any, locked
  first: the counter's trigger locks it, and always before the tenant's row) and the caller
  re-reads the eligible accounts' counters after the commit,
  admitting if a slot is free (the lost wake-up, docs/admission.md "One decision" step 4).
- **Reservations** (``p_keep_reservations``): a claim of a tenant without an unfilled
  reservation of its own takes a slot only if the pool's free slots, less this one, still
  cover the unfilled reservations (``reserved - in_use``, shrunk as ``effective_guarantees``
  shrinks them) of every other tenant.

The return shape is 0009's; ``free_elsewhere`` keeps its meaning (a free slot was seen on an
eligible account at the decision, the tenant below its maximum). **Mixed fleet:** 0009's and
0007's claims stay for the releases that call them; all take the same locks in the same
order (request, the global lock for ``default``, accounts, tenants), so they mix.
"""

from collections.abc import Sequence

from alembic import op

from orchestrator.db.compatibility import declare, withdraw

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_TENANT = "default"
CLAIM_SIGNATURE = (
    "orchestrator_claim(uuid, text, text, text, jsonb, text, jsonb, integer, integer, text,"
    " text, jsonb, text, text, double precision, integer, boolean)"
)
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
    SELECT FROM tenants p JOIN tenant_usage u ON u.name = p.name
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
          LEFT JOIN tenant_usage u ON u.name = p.name
         WHERE p.reserved > 0)
    SELECT pool.unbounded, pool.free,
           coalesce((SELECT sum(h.hole) FROM holes h), 0)::integer,
           coalesce((SELECT sum(h.hole) FROM holes h WHERE h.name = p_tenant), 0)::integer,
           coalesce((SELECT array_agg(h.name) FROM holes h WHERE h.hole > 0), '{{}}')
      INTO pool_unbounded, pool_free, all_unfilled, own_unfilled, unfilled_tenants
      FROM pool"""  # noqa: S608 - built from this module's constants, no input

CLAIM = f"""
CREATE FUNCTION orchestrator_claim(
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
    tenant_full := tenant_maximum IS NOT NULL AND coalesce(
        (SELECT u.in_use FROM tenant_usage u WHERE u.name = p_tenant), 0) >= tenant_maximum;
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
                -- The tenant's usage row, after the account's (its maximum holds across accounts).
                INSERT INTO tenant_usage (name) VALUES (p_tenant) ON CONFLICT (name) DO NOTHING;
                SELECT u.in_use, u.waiting INTO tenant_live, tenant_waiting
                  FROM tenant_usage u WHERE u.name = p_tenant FOR UPDATE;
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
        INSERT INTO tenant_usage (name) VALUES (p_tenant) ON CONFLICT (name) DO NOTHING;
        SELECT u.in_use, u.waiting INTO tenant_live, tenant_waiting
          FROM tenant_usage u WHERE u.name = p_tenant FOR UPDATE;
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
    op.execute(CLAIM)  # beside 0009's and 0007's, which the releases at 0009 and 0007 call
    declare(revision, down_revision, oldest_served="0004")  # an expansion: 0009's value


def downgrade() -> None:
    withdraw(revision)
    op.execute(f"DROP FUNCTION {CLAIM_SIGNATURE}")
