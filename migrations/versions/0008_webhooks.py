"""webhooks: endpoints, their signing secrets, deliveries and attempts

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 06:10:00.000000

- ``webhook_endpoints``: a receiver's URL, the event types it takes, an optional tenant
  filter, whether it is disabled (and why), and since when it has been failing.
- ``webhook_secrets``: its signing secrets, Fernet-encrypted with a key from the environment
  (never plain text); several per endpoint during a rotation, the old one with an expiry.
- ``webhook_deliveries``: one per event and endpoint, with its stable ``webhook_id``, status,
  attempts and ``next_attempt_at`` (the sender schedules from the database, not the broker).
- ``webhook_attempts``: each try (status code, duration, an error cut to fit), for admins.
- ``event_outbox.webhooks_fanned_at``: when the sender turned the event into deliveries
  (rows written before this migration are marked, so no old event is sent).
- ``admin_webhook_endpoints``: endpoints with their delivery counts, no secret.

Expand only: the releases this schema serves (from 0004) write and relay ``event_outbox`` as
before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from orchestrator.db.compatibility import declare, withdraw

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("CURRENT_TIMESTAMP")

ADMIN_VIEW = """
CREATE VIEW admin_webhook_endpoints AS
SELECT e.id, e.url, e.event_types, e.tenant, e.description,
       e.disabled_at IS NULL AS enabled, e.disabled_at, e.disabled_reason, e.failing_since,
       (SELECT count(*) FROM webhook_secrets k
         WHERE k.endpoint_id = e.id AND (k.expires_at IS NULL OR k.expires_at > now())
       )::integer AS signing_keys,
       (SELECT count(*) FROM webhook_deliveries d
         WHERE d.endpoint_id = e.id AND d.status = 'pending')::integer AS pending,
       (SELECT count(*) FROM webhook_deliveries d
         WHERE d.endpoint_id = e.id AND d.status = 'given_up'
           AND d.finished_at > now() - interval '24 hours')::integer AS given_up_24h,
       (SELECT max(a.attempted_at) FROM webhook_attempts a
          JOIN webhook_deliveries d ON d.id = a.delivery_id
         WHERE d.endpoint_id = e.id) AS last_attempt_at,
       e.created_at
  FROM webhook_endpoints e
 ORDER BY e.created_at, e.id
"""


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_types", postgresql.ARRAY(sa.String(length=64)), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_reason", sa.String(length=64), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_table(
        "webhook_secrets",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_secrets_endpoint_id_webhook_endpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_secrets")),
    )
    op.create_index(
        "ix_webhook_secrets_endpoint_id", "webhook_secrets", ["endpoint_id"], unique=False
    )
    op.add_column(
        "event_outbox", sa.Column("webhooks_fanned_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute("UPDATE event_outbox SET webhooks_fanned_at = created_at")
    op.create_index(
        "ix_event_outbox_webhooks_pending",
        "event_outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("webhooks_fanned_at IS NULL"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("outbox_id", sa.BigInteger(), nullable=False),
        sa.Column("webhook_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("order_key", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "next_attempt_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False
        ),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("given_up_reason", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'given_up')",
            name=op.f("ck_webhook_deliveries_status"),
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_deliveries_endpoint_id_webhook_endpoints"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["outbox_id"],
            ["event_outbox.id"],
            name=op.f("fk_webhook_deliveries_outbox_id_event_outbox"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint(
            "endpoint_id", "outbox_id", name=op.f("uq_webhook_deliveries_endpoint_id_outbox_id")
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_webhook_deliveries_pending_order",
        "webhook_deliveries",
        ["endpoint_id", "order_key", "outbox_id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_webhook_deliveries_outbox_id", "webhook_deliveries", ["outbox_id"], unique=False
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_attempts_delivery_id_webhook_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    op.create_index(
        "ix_webhook_attempts_delivery_id", "webhook_attempts", ["delivery_id"], unique=False
    )
    op.execute(ADMIN_VIEW)
    declare(revision, down_revision, oldest_served="0004")


def downgrade() -> None:
    withdraw(revision)
    op.execute("DROP VIEW admin_webhook_endpoints")
    op.drop_index("ix_webhook_attempts_delivery_id", table_name="webhook_attempts")
    op.drop_table("webhook_attempts")
    op.drop_index("ix_webhook_deliveries_outbox_id", table_name="webhook_deliveries")
    op.drop_index(
        "ix_webhook_deliveries_pending_order",
        table_name="webhook_deliveries",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index(
        "ix_webhook_deliveries_due",
        table_name="webhook_deliveries",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_table("webhook_deliveries")
    op.drop_index(
        "ix_event_outbox_webhooks_pending",
        table_name="event_outbox",
        postgresql_where=sa.text("webhooks_fanned_at IS NULL"),
    )
    op.drop_column("event_outbox", "webhooks_fanned_at")
    op.drop_index("ix_webhook_secrets_endpoint_id", table_name="webhook_secrets")
    op.drop_table("webhook_secrets")
    op.drop_table("webhook_endpoints")
