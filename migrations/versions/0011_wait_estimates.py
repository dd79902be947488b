"""wait estimates: each waiting request's latest expected wait and what it was last told

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 09:00:00.000000

docs/admission.md ("The expected wait") is the design; this is where its results live.

- ``wait_estimates``: one row per waiting request (keyed by ``sessions.id``): its
  ``position`` (1 = next), ``p50_seconds`` and ``p90_seconds`` from
  ``estimated_at`` (NULL: no end in sight within the estimate's look-ahead), and what the
  last ``session.waiting`` event told it (``sent_at``, the expected admission instants
  ``sent_p50_at``/``sent_p90_at``, NULL when infinite; ``sent_count``), which
  ``tenants.should_resend`` compares the next estimate with.

  A table of its own rather than columns on ``sessions``: the estimate pass rewrites every
  waiting request's estimate each interval, and ``sessions`` is the hot table every start,
  stop and sweep updates, watched by the counters' statement triggers and scanned by the
  previous release. A separate narrow table keeps that churn (dead tuples, index updates) off
  it, touches nothing the previous release reads or writes, and is emptied of a request's
  row by the next pass once the request no longer waits. No foreign key to ``sessions``: its
  check would take a ``KEY SHARE`` lock on each waiting row the pass writes, and admission
  takes waiting rows ``FOR UPDATE SKIP LOCKED``, so it would pass over a request the
  estimate is writing and admit a younger one.
- ``admin_waiting_estimates``: the waiting requests with their estimates, in the order they
  are expected to be admitted (docs/admin.md); no secret.

Expand only: a new table and a new view; the previous release never sees them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from orchestrator.db.compatibility import declare, withdraw

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN_VIEW = """
CREATE VIEW admin_waiting_estimates AS
SELECT s.request_id, s.tenant, coalesce(s.account, s.requested_account) AS account,
       s.created_at, now() - s.created_at AS waiting_for,
       e.position, e.p50_seconds, e.p90_seconds, e.estimated_at,
       e.sent_at AS last_sent_at, coalesce(e.sent_count, 0) AS events_sent
  FROM sessions s
  LEFT JOIN wait_estimates e ON e.session_id = s.id
 WHERE s.status = 'waiting'
 ORDER BY e.position NULLS LAST, s.created_at, s.id
"""


def upgrade() -> None:
    op.create_table(
        "wait_estimates",
        sa.Column("session_id", sa.Uuid(), primary_key=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("p50_seconds", sa.Float(), nullable=True),
        sa.Column("p90_seconds", sa.Float(), nullable=True),
        sa.Column("estimated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_p50_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_p90_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_count", sa.Integer(), server_default="0", nullable=False),
        sa.CheckConstraint("position >= 1", name="wait_estimates_position"),
        sa.CheckConstraint(
            "p50_seconds IS NULL OR p50_seconds >= 0", name="wait_estimates_p50_seconds"
        ),
        sa.CheckConstraint(
            "p90_seconds IS NULL OR p90_seconds >= 0", name="wait_estimates_p90_seconds"
        ),
    )
    op.execute(ADMIN_VIEW)
    declare(revision, down_revision, oldest_served="0004")  # an expansion: v0.1.0 still served


def downgrade() -> None:
    withdraw(revision)
    op.execute("DROP VIEW admin_waiting_estimates")
    op.drop_table("wait_estimates")
