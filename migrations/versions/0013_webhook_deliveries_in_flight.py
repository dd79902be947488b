"""webhook claims that read what they look for: the deliveries in flight, and each open
endpoint's due deliveries in order

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 12:30:00.000000

The sender's claim first counts each endpoint's deliveries in flight (pending and leased),
to give an endpoint no more than its share of attempts at once. With only the pending
deliveries indexed, that count read every pending delivery: a dead endpoint's backlog
(thousands waiting while its slots wait out their timeouts) made every claim, for every
endpoint, slower in proportion (4.5 ms with none pending, 15 ms with 20,000 on this
machine). Leases are cleared when an attempt's outcome is recorded, so the leased pending
deliveries are those in flight plus the few a dead sender left: this index holds only them.

The claim then found each session's next delivery over every pending delivery of the open
endpoints, and the planner, which can only guess one endpoint's share of the table (the
average: half, with two endpoints), read them all. The second index orders each endpoint's
pending deliveries by when they are due, so the claim walks an open endpoint's due
deliveries in that order and stops at its free slots (``LIMIT``), whatever the statistics.

Expand only: two new indexes on the sender's own table (a plain ``CREATE INDEX``: it holds off
the sender's writes to that table while it builds, which the sender retries).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from orchestrator.db.compatibility import declare, withdraw

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_webhook_deliveries_endpoint_due",
        "webhook_deliveries",
        ["endpoint_id", "next_attempt_at", "outbox_id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_webhook_deliveries_in_flight",
        "webhook_deliveries",
        ["endpoint_id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending' AND lease_until IS NOT NULL"),
    )
    declare(revision, down_revision, oldest_served="0004")  # an expansion: 0012's value


def downgrade() -> None:
    withdraw(revision)
    op.drop_index("ix_webhook_deliveries_in_flight", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_endpoint_due", table_name="webhook_deliveries")
