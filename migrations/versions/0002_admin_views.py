"""admin views: the questions an operator asks, with no token and no secret

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 09:00:00.000000

What each view answers: docs/admin.md.

None of these views may select ``livekit_token``, ``request_payload`` (it can hold the
customer's LLM keys until the start has finished), ``claim_id``, ``traceparent`` or any
``session_events.detail`` as a whole; tests/test_admin_queries.py checks the column names and
the output. The views run with their owner's rights, so a role granted SELECT on them alone
reads no other column (docs/admin.md, "A read-only role").

No index is added. The live views filter by ``status`` (``ix_sessions_status_created_at`` and
the partial indexes of 0001); the statistics views and ``admin_concurrency`` read the table
once on purpose (all-time figures; a session that ended within 24 h may have started any time
before). Measured on 1 M sessions: the live views take a few ms, the others 0.5-2 s.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS: dict[str, str] = {
    # Everything not finished: queued, starting, running, being stopped.
    "admin_live_sessions": """
SELECT s.request_id,
       s.status,
       s.avatar_id,
       s.vendor_session_id,
       s.livekit_room,
       s.created_at,
       s.start_deadline_at,
       s.started_at,
       s.expires_at,
       floor(extract(epoch FROM s.expires_at - now()))::integer AS seconds_left,
       s.stop_requested_at,
       CASE WHEN s.stop_requested_at IS NOT NULL THEN s.end_reason END AS stop_reason,
       s.stop_attempts,
       s.attempts AS start_attempts,
       now() - s.created_at AS age,
       s.metadata
FROM sessions AS s
WHERE s.status IN ('waiting', 'starting', 'active', 'stopping')
ORDER BY s.created_at, s.request_id
""",
    # Per avatar: how many, in which state, and how long ended sessions ran. Counts by hash
    # aggregation, the median over a materialized list of durations: the planner would
    # otherwise read the whole table through ix_sessions_avatar_id to feed percentile_cont
    # in avatar order, about 3x slower on a million rows than a scan and a sort.
    "admin_sessions_by_avatar": """
WITH counts AS (
    SELECT s.avatar_id,
           count(*)::integer AS total,
           (count(*) FILTER (WHERE s.status = 'waiting'))::integer AS waiting,
           (count(*) FILTER (WHERE s.status IN ('starting', 'active', 'stopping')))::integer
               AS live,
           (count(*) FILTER (WHERE s.status = 'ended'))::integer AS ended,
           (count(*) FILTER (WHERE s.status = 'failed'))::integer AS failed,
           max(s.created_at) AS last_request_at
    FROM sessions AS s
    GROUP BY s.avatar_id
),
durations AS MATERIALIZED (
    SELECT s.avatar_id, extract(epoch FROM s.ended_at - s.started_at) AS seconds
    FROM sessions AS s
    WHERE s.status = 'ended' AND s.started_at IS NOT NULL AND s.ended_at IS NOT NULL
),
stats AS (
    SELECT d.avatar_id,
           avg(d.seconds) AS avg_seconds,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY d.seconds::double precision)
               AS p50_seconds
    FROM durations AS d
    GROUP BY d.avatar_id
)
SELECT c.avatar_id,
       c.total,
       c.waiting,
       c.live,
       c.ended,
       c.failed,
       round(st.avg_seconds, 1) AS avg_duration_seconds,
       round(st.p50_seconds::numeric, 1) AS p50_duration_seconds,
       c.last_request_at
FROM counts AS c
LEFT JOIN stats AS st ON st.avatar_id IS NOT DISTINCT FROM c.avatar_id
ORDER BY c.total DESC, c.avatar_id NULLS LAST
""",
    # Ended sessions that had started, by how long they ran at the vendor (stop phase included).
    # One pass: width_bucket numbers a duration by the buckets' lower bounds (0 below the first).
    "admin_duration_distribution": """
WITH buckets (bucket_order, bucket, min_seconds, max_seconds) AS (
    VALUES (1, '< 1 min', NULL::integer, 60),
           (2, '1-5 min', 60, 300),
           (3, '5-15 min', 300, 900),
           (4, '15-30 min', 900, 1800),
           (5, '30-60 min', 1800, 3600),
           (6, '60+ min', 3600, NULL::integer)
),
counted AS (
    SELECT width_bucket(
               extract(epoch FROM s.ended_at - s.started_at),
               (SELECT array_agg(b.min_seconds::numeric ORDER BY b.bucket_order)
                FROM buckets AS b
                WHERE b.min_seconds IS NOT NULL)
           ) + 1 AS bucket_order,
           count(*) AS sessions
    FROM sessions AS s
    WHERE s.status = 'ended' AND s.started_at IS NOT NULL AND s.ended_at IS NOT NULL
    GROUP BY 1
)
SELECT b.bucket_order,
       b.bucket,
       b.min_seconds,
       b.max_seconds,
       coalesce(c.sessions, 0)::integer AS sessions,
       round(100.0 * coalesce(c.sessions, 0) / nullif(sum(c.sessions) OVER (), 0), 1) AS percent
FROM buckets AS b
LEFT JOIN counted AS c ON c.bucket_order = b.bucket_order
ORDER BY b.bucket_order
""",
    # Failed requests by our error code: last 7 days and all time, with the latest message.
    "admin_failures_by_error_code": """
SELECT s.error_code,
       (count(*) FILTER (
           WHERE coalesce(s.ended_at, s.created_at) >= now() - interval '7 days'
       ))::integer AS failures_7d,
       count(*)::integer AS failures_total,
       max(coalesce(s.ended_at, s.created_at)) AS last_seen,
       (array_agg(s.error_message ORDER BY coalesce(s.ended_at, s.created_at) DESC, s.id))[1]
           AS example_error_message
FROM sessions AS s
WHERE s.status = 'failed'
GROUP BY s.error_code
ORDER BY failures_7d DESC, failures_total DESC, s.error_code NULLS LAST
""",
    # Why ended sessions ended (the vendor's vocabulary).
    "admin_end_reasons": """
SELECT s.end_reason,
       count(*)::integer AS sessions,
       (count(*) FILTER (WHERE s.ended_at >= now() - interval '7 days'))::integer AS sessions_7d,
       max(s.ended_at) AS last_seen
FROM sessions AS s
WHERE s.status = 'ended'
GROUP BY s.end_reason
ORDER BY sessions DESC, s.end_reason NULLS LAST
""",
    # Sessions running at the vendor in each minute of the last 24 h, next to the vendor's cap.
    # A session counts in minute m if [started_at, coalesce(ended_at, now())) overlaps
    # [m, m + 1 min). Computed as a sweep (+1 where a span begins, -1 after it ends, running
    # sum), so the cost follows the number of sessions, not sessions x 1441 minutes.
    "admin_concurrency": """
WITH bounds AS (
    SELECT date_trunc('minute', now()) - interval '24 hours' AS first_minute,
           date_trunc('minute', now()) AS last_minute
),
spans AS (
    SELECT greatest(date_trunc('minute', s.started_at), b.first_minute) AS from_minute,
           least(
               date_trunc('minute', coalesce(s.ended_at, now()) - interval '1 microsecond'),
               b.last_minute
           ) AS to_minute
    FROM sessions AS s
    CROSS JOIN bounds AS b
    WHERE s.started_at IS NOT NULL
      AND s.started_at < b.last_minute + interval '1 minute'
      AND coalesce(s.ended_at, now()) > b.first_minute
),
deltas AS (
    SELECT from_minute AS minute, 1 AS delta FROM spans WHERE from_minute <= to_minute
    UNION ALL
    SELECT to_minute + interval '1 minute', -1 FROM spans WHERE from_minute <= to_minute
),
per_minute AS (
    SELECT minute, sum(delta) AS delta FROM deltas GROUP BY minute
)
SELECT m.minute,
       (sum(coalesce(p.delta, 0)) OVER (ORDER BY m.minute))::integer AS live_sessions,
       (SELECT c.max_session_numbers
        FROM sessions AS c
        WHERE c.max_session_numbers IS NOT NULL
        ORDER BY c.started_at DESC NULLS LAST
        LIMIT 1) AS vendor_cap
FROM bounds AS b
CROSS JOIN LATERAL generate_series(b.first_minute, b.last_minute, interval '1 minute')
    AS m (minute)
LEFT JOIN per_minute AS p ON p.minute = m.minute
ORDER BY m.minute
""",
    # The queue for a free slot: how deep, how old, how many will give up at a deadline.
    "admin_waiting_queue": """
SELECT count(*)::integer AS waiting,
       min(s.created_at) AS oldest_created_at,
       now() - min(s.created_at) AS oldest_wait,
       floor(extract(epoch FROM now() - min(s.created_at)))::integer AS oldest_wait_seconds,
       count(s.start_deadline_at)::integer AS with_deadline,
       min(s.start_deadline_at) AS next_deadline_at,
       (count(*) FILTER (WHERE s.start_deadline_at <= now()))::integer AS past_deadline
FROM sessions AS s
WHERE s.status = 'waiting'
""",
    # The 3 a.m. view: rows that should have moved on by now.
    "admin_stuck": """
WITH stuck AS (
    SELECT 'start_overdue' AS problem,
           s.id,
           now() - coalesce(s.start_sent_at, s.created_at) AS stuck_for
    FROM sessions AS s
    WHERE s.status = 'starting'
      AND coalesce(s.start_sent_at, s.created_at) < now() - interval '2 minutes'
    UNION ALL
    SELECT 'stop_failing', s.id, now() - coalesce(s.stop_requested_at, s.expires_at)
    FROM sessions AS s
    WHERE s.status = 'stopping' AND s.stop_attempts > 0
    UNION ALL
    SELECT 'past_expiry', s.id, now() - s.expires_at
    FROM sessions AS s
    WHERE s.status = 'active' AND s.expires_at < now() - interval '1 minute'
)
SELECT k.problem,
       k.stuck_for,
       s.request_id,
       s.status,
       s.avatar_id,
       s.vendor_session_id,
       s.created_at,
       s.start_sent_at,
       s.started_at,
       s.expires_at,
       s.stop_requested_at,
       s.end_reason AS stop_reason,
       s.stop_attempts,
       s.stop_retry_at AS next_stop_retry_at,
       s.attempts AS start_attempts,
       last_stop.error AS last_stop_error,
       last_stop.occurred_at AS last_stop_error_at
FROM stuck AS k
JOIN sessions AS s ON s.id = k.id
LEFT JOIN LATERAL (
    SELECT e.detail ->> 'error' AS error, e.occurred_at
    FROM session_events AS e
    WHERE e.session_id = s.id AND e.kind = 'stop_attempt_failed'
    ORDER BY e.id DESC
    LIMIT 1
) AS last_stop ON true
ORDER BY k.stuck_for DESC, s.request_id
""",
}


RARE_KINDS = (
    "kind IN ('orphan_stopped', 'compensated', 'duplicate_conflict', 'stop_attempt_failed')"
)


def upgrade() -> None:
    # The operators' event queries look for rare kinds in a large, append-only table.
    op.create_index(
        "ix_session_events_rare_kind_occurred_at",
        "session_events",
        ["kind", "occurred_at"],
        postgresql_where=sa.text(RARE_KINDS),
    )
    for name, query in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {query.strip()}")
        op.execute(f"COMMENT ON VIEW {name} IS 'session-orchestrator admin view; docs/admin.md'")


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("ix_session_events_rare_kind_occurred_at", table_name="session_events")
