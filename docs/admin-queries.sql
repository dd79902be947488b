-- session-orchestrator: ready-to-run admin queries (PostgreSQL; the views come from migration 0002).
--
-- Paste one query into psql, or run them all:  psql "$URL" -v request_id=REQ-123 -f docs/admin-queries.sql
-- Queries that take a request id read the psql variable request_id:  \set request_id 'REQ-123'
-- "today" means today in the session's time zone; run  SET TIME ZONE 'UTC';  first for UTC days.
-- None of these reads livekit_token, request_payload, claim_id, traceparent or event_outbox.body,
-- so they all run as the read-only role of docs/admin.md. Each query below is executed against
-- real Postgres, with data that makes its answer checkable, in tests/test_admin_queries.py.
-- Format: every query starts with a "-- name: <slug>" line, then one comment line saying what
-- it answers, then a single SQL statement.

-- name: live-sessions
-- What is queued, starting, running or being stopped right now, and how long each has left?
SELECT * FROM admin_live_sessions ORDER BY created_at, request_id;

-- name: live-counts
-- How many sessions are in each unfinished status right now?
SELECT status, count(*)::integer AS sessions
FROM sessions
WHERE status IN ('waiting', 'starting', 'active', 'stopping')
GROUP BY status
ORDER BY array_position(ARRAY['waiting', 'starting', 'active', 'stopping']::text[], status::text);

-- name: sessions-by-avatar
-- Per avatar: how many requests, in which state, and how long the ended sessions ran.
SELECT * FROM admin_sessions_by_avatar ORDER BY total DESC, avatar_id NULLS LAST;

-- name: duration-distribution
-- How long do ended sessions really run (ended_at - started_at), in buckets?
SELECT * FROM admin_duration_distribution ORDER BY bucket_order;

-- name: failures-by-error-code
-- Which error codes fail requests, in the last 7 days and all time, with the latest message?
SELECT * FROM admin_failures_by_error_code
ORDER BY failures_7d DESC, failures_total DESC, error_code NULLS LAST;

-- name: recent-failures
-- The 20 most recent failed requests, newest first.
SELECT request_id, avatar_id, error_code, error_message, attempts AS start_attempts,
       created_at, ended_at
FROM sessions
WHERE status = 'failed'
ORDER BY ended_at DESC NULLS LAST, request_id
LIMIT 20;

-- name: end-reasons
-- Why did sessions end (the vendor's vocabulary), how often, and when last?
SELECT * FROM admin_end_reasons ORDER BY sessions DESC, end_reason NULLS LAST;

-- name: concurrency-last-24h
-- Minutes of the last 24 h with sessions running at the vendor, next to the vendor's cap.
SELECT minute, live_sessions, vendor_cap
FROM admin_concurrency
WHERE live_sessions > 0
ORDER BY minute;

-- name: concurrency-peak-by-hour
-- Peak number of sessions running at the vendor in each hour of the last 24 h, vs the cap.
SELECT date_trunc('hour', minute) AS hour,
       max(live_sessions) AS peak_live_sessions,
       max(vendor_cap) AS vendor_cap
FROM admin_concurrency
GROUP BY date_trunc('hour', minute)
ORDER BY hour;

-- name: waiting-queue
-- How many requests wait for a slot, how long the oldest has waited, how many have a deadline?
SELECT * FROM admin_waiting_queue;

-- name: stuck
-- What needs a human now: starts overdue, stops the vendor keeps refusing, expiry not enforced.
SELECT * FROM admin_stuck ORDER BY stuck_for DESC, request_id;

-- name: request-summary
-- What happened to the request in psql variable request_id? Its row (no token, payload or claim).
SELECT request_id, status, avatar_id, vendor_session_id, livekit_room, created_at,
       start_deadline_at, start_sent_at, started_at, expires_at, stop_requested_at, ended_at,
       end_reason, error_code, error_message, attempts AS start_attempts, stop_attempts,
       granted_max_duration_minutes, max_duration_seconds, ended_at - started_at AS ran_for,
       metadata
FROM sessions
WHERE request_id = :'request_id';

-- name: request-events
-- What happened to that request, step by step: its events, and compensating stops made for it?
SELECT e.occurred_at, e.id AS event_id, e.kind, e.vendor_session_id, e.detail - 'claim_id' AS detail
FROM sessions AS s
JOIN session_events AS e ON e.session_id = s.id
WHERE s.request_id = :'request_id'
UNION ALL
SELECT e.occurred_at, e.id, e.kind, e.vendor_session_id, e.detail - 'claim_id'
FROM session_events AS e
WHERE e.session_id IS NULL
  AND e.kind = 'compensated'
  AND e.detail ->> 'request_id' = :'request_id'
ORDER BY occurred_at, event_id;

-- name: reaper-lag
-- Which sessions started in the last 7 days ran (or still run) more than 10 s past expires_at?
SELECT request_id, status, avatar_id, vendor_session_id, end_reason, expires_at, ended_at,
       coalesce(ended_at, now()) - expires_at AS overrun
FROM sessions
WHERE status IN ('active', 'stopping', 'ended')
  AND started_at >= now() - interval '7 days'
  AND coalesce(ended_at, now()) > expires_at + interval '10 seconds'
ORDER BY overrun DESC, request_id;

-- name: orphans-stopped-today
-- Which vendor sessions with no row did the reconciler stop today (ZOMBIE_SESSION_REAP)?
SELECT occurred_at, vendor_session_id, detail ->> 'reason' AS reason,
       detail ->> 'vendor_outcome' AS vendor_outcome,
       detail ->> 'vendor_created_at' AS vendor_created_at
FROM session_events
WHERE kind = 'orphan_stopped'
  AND occurred_at >= date_trunc('day', now())
ORDER BY occurred_at, id;

-- name: compensations
-- Which vendor sessions did a worker stop right after starting them, in the last 7 days, and why?
SELECT occurred_at, detail ->> 'request_id' AS request_id, vendor_session_id,
       detail ->> 'why' AS why
FROM session_events
WHERE kind = 'compensated'
  AND occurred_at >= now() - interval '7 days'
ORDER BY occurred_at, id;

-- name: duplicate-conflicts
-- Which request_ids came again with a different payload in the last 7 days (repeat ignored)?
SELECT e.occurred_at, s.request_id, s.status,
       coalesce(e.detail ->> 'error', e.detail ->> 'note') AS note
FROM session_events AS e
LEFT JOIN sessions AS s ON s.id = e.session_id
WHERE e.kind = 'duplicate_conflict'
  AND e.occurred_at >= now() - interval '7 days'
ORDER BY e.occurred_at, e.id;

-- name: stop-failures-last-24h
-- Which vendor stops failed in the last 24 h, and with what error?
SELECT e.occurred_at, s.request_id, s.status, e.vendor_session_id,
       (e.detail ->> 'attempt')::integer AS attempt, e.detail ->> 'error' AS error
FROM session_events AS e
LEFT JOIN sessions AS s ON s.id = e.session_id
WHERE e.kind = 'stop_attempt_failed'
  AND e.occurred_at >= now() - interval '24 hours'
ORDER BY e.occurred_at, e.id;

-- name: outbox-backlog
-- Are lifecycle events stuck before the broker (unpublished outbox rows and the oldest one's age)?
SELECT count(*)::integer AS unpublished,
       min(created_at) AS oldest_created_at,
       now() - min(created_at) AS oldest_age
FROM event_outbox
WHERE published_at IS NULL;

-- name: accounts
-- Per vendor account: its caps, sessions in use and waiting, whether it takes new starts, its last error.
SELECT name, effective_cap, configured_cap, reported_limit, limited_cap, in_use, waiting,
       in_catalog AND enabled AND NOT draining
           AND (circuit_open_until IS NULL OR circuit_open_until <= now()) AS takes_starts,
       enabled, draining, circuit_open_until, consecutive_failures, last_error, last_error_at
FROM vendor_accounts
ORDER BY name;

-- name: webhook-endpoints
-- Which webhook endpoints exist, are they enabled, failing, or falling behind (no secrets)?
SELECT id, url, event_types, tenant, enabled, disabled_reason, failing_since, signing_keys,
       pending, given_up_24h, last_attempt_at
FROM admin_webhook_endpoints
ORDER BY enabled, created_at, id;

-- name: webhook-failures-last-24h
-- Which webhook attempts failed in the last 24 h, to which endpoint, with what answer?
SELECT a.attempted_at, d.endpoint_id, e.url, d.event_type, d.webhook_id, d.status,
       d.attempts, a.status_code, a.duration_ms, a.error
FROM webhook_attempts AS a
JOIN webhook_deliveries AS d ON d.id = a.delivery_id
JOIN webhook_endpoints AS e ON e.id = d.endpoint_id
WHERE (a.status_code IS NULL OR a.status_code NOT BETWEEN 200 AND 299)
  AND a.attempted_at >= now() - interval '24 hours'
ORDER BY a.attempted_at, a.id;

-- name: tenants
-- Per tenant: its policy (defaults for a tenant nobody configured), sessions in use across every account, requests waiting, since when.
SELECT u.name AS tenant, coalesce(p.guaranteed, 0) AS guaranteed, coalesce(p.reserved, 0) AS reserved,
       p.maximum, coalesce(p.weight, 1) AS weight, p.max_waiting, u.in_use, u.waiting,
       (SELECT min(s.created_at) FROM sessions s
         WHERE s.status = 'waiting' AND s.tenant = u.name) AS oldest_waiting_at,
       round(u.used_seconds::numeric, 1) AS used_seconds_decayed, p.updated_at AS policy_updated_at
FROM tenant_totals u LEFT JOIN tenants p ON p.name = u.name
UNION ALL
SELECT p.name, p.guaranteed, p.reserved, p.maximum, p.weight, p.max_waiting, 0, 0, NULL, 0, p.updated_at
FROM tenants p WHERE NOT EXISTS (SELECT FROM tenant_totals u WHERE u.name = p.name)
ORDER BY tenant;
