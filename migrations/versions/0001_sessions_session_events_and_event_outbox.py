"""sessions, session_events and event_outbox

Revision ID: 0001
Revises:
Create Date: 2026-11-25 16:53:05.634751
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "event_outbox",
        sa.Column(
            "id",
            sa.BigInteger(),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("routing_key", sa.String(length=64), nullable=False),
        sa.Column(
            "body",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("traceparent", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_event_outbox_event_id")),
    )
    op.create_index(
        "ix_event_outbox_unpublished",
        "event_outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("avatar_id", sa.Text(), nullable=True),
        sa.Column(
            "request_payload",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
        ),
        sa.Column("payload_sha256", sa.String(length=64), nullable=False),
        sa.Column("claim_id", sa.String(length=255), nullable=True),
        sa.Column("vendor_session_id", sa.String(length=255), nullable=True),
        sa.Column("voice_id", sa.Text(), nullable=True),
        sa.Column("livekit_url", sa.Text(), nullable=True),
        sa.Column("livekit_room", sa.Text(), nullable=True),
        sa.Column("livekit_token", sa.Text(), nullable=True),
        sa.Column("livekit_token_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("granted_max_duration_minutes", sa.Integer(), nullable=True),
        sa.Column("max_session_numbers", sa.Integer(), nullable=True),
        sa.Column("max_duration_seconds", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.Column("start_deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("start_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(length=64), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("traceparent", sa.String(length=128), nullable=True),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=True,
        ),
        sa.CheckConstraint(
            "status IN ('waiting', 'starting', 'active', 'stopping', 'ended', 'failed')",
            name=op.f("ck_sessions_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
        sa.UniqueConstraint("request_id", name=op.f("uq_sessions_request_id")),
        sa.UniqueConstraint("vendor_session_id", name=op.f("uq_sessions_vendor_session_id")),
    )
    op.create_index(
        "ix_sessions_active_expires_at",
        "sessions",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_index("ix_sessions_avatar_id", "sessions", ["avatar_id"], unique=False)
    op.create_index("ix_sessions_started_at", "sessions", ["started_at"], unique=False)
    op.create_index(
        "ix_sessions_status_created_at", "sessions", ["status", "created_at"], unique=False
    )
    op.create_index(
        "ix_sessions_stopping_stop_retry_at",
        "sessions",
        ["stop_retry_at"],
        unique=False,
        postgresql_where=sa.text("status = 'stopping'"),
    )
    op.create_index(
        "ix_sessions_waiting_created_at",
        "sessions",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("status = 'waiting'"),
    )
    op.create_table(
        "session_events",
        sa.Column(
            "id",
            sa.BigInteger(),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("session_id", sa.Uuid(), nullable=True),
        sa.Column("vendor_session_id", sa.String(length=255), nullable=True),
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column(
            "detail",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_session_events_session_id_sessions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_session_events")),
    )
    op.create_index(
        "ix_session_events_session_id_id", "session_events", ["session_id", "id"], unique=False
    )
    op.create_index(
        op.f("ix_session_events_vendor_session_id"),
        "session_events",
        ["vendor_session_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_session_events_vendor_session_id"), table_name="session_events")
    op.drop_index("ix_session_events_session_id_id", table_name="session_events")
    op.drop_table("session_events")
    op.drop_index(
        "ix_sessions_waiting_created_at",
        table_name="sessions",
        postgresql_where=sa.text("status = 'waiting'"),
    )
    op.drop_index(
        "ix_sessions_stopping_stop_retry_at",
        table_name="sessions",
        postgresql_where=sa.text("status = 'stopping'"),
    )
    op.drop_index("ix_sessions_status_created_at", table_name="sessions")
    op.drop_index("ix_sessions_started_at", table_name="sessions")
    op.drop_index("ix_sessions_avatar_id", table_name="sessions")
    op.drop_index(
        "ix_sessions_active_expires_at",
        table_name="sessions",
        postgresql_where=sa.text("status = 'active'"),
    )
    op.drop_table("sessions")
    op.drop_index(
        "ix_event_outbox_unpublished",
        table_name="event_outbox",
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.drop_table("event_outbox")
