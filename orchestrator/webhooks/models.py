"""Typed models of the webhook tables (migration 0008); names are a contract admins read
(docs/admin.md). The signing secrets are stored only as Fernet ciphertext."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.db import Base
from orchestrator.db.types import UTCDateTime, utcnow


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    GIVEN_UP = "given_up"


def _created() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow, server_default=text("CURRENT_TIMESTAMP"))


class WebhookEndpoint(Base):
    """A receiver: its URL, the event types it takes, an optional tenant filter."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(ARRAY(String(64)))
    tenant: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(String(64))
    # The first failure since the last success: past ORCHESTRATOR_WEBHOOK_DISABLE_AFTER_SECONDS
    # the endpoint is disabled (an ``endpoint.disabled`` event).
    failing_since: Mapped[datetime | None]


class WebhookSecret(Base):
    """One signing secret (``whsec_…``), encrypted; an old one expires after a rotation."""

    __tablename__ = "webhook_secrets"
    __table_args__ = (Index("ix_webhook_secrets_endpoint_id", "endpoint_id"),)

    id: Mapped[int] = mapped_column(BigInteger(), primary_key=True, autoincrement=True)
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime | None]


class WebhookDelivery(Base):
    """One event for one endpoint: the same ``webhook_id`` on every attempt; scheduled by
    ``next_attempt_at`` (the database's clock), held by a lease while an attempt runs."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'given_up')", name="status"),
        UniqueConstraint("endpoint_id", "outbox_id"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        # A session's earlier event to the same endpoint, still pending, holds the later back.
        Index(
            "ix_webhook_deliveries_pending_order",
            "endpoint_id",
            "order_key",
            "outbox_id",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_webhook_deliveries_outbox_id", "outbox_id"),
        # Each endpoint's pending deliveries in the order they fall due (0013).
        Index(
            "ix_webhook_deliveries_endpoint_due",
            "endpoint_id",
            "next_attempt_at",
            "outbox_id",
            postgresql_where=text("status = 'pending'"),
        ),
        # The deliveries in flight (leased), counted per endpoint by every claim (0013).
        Index(
            "ix_webhook_deliveries_in_flight",
            "endpoint_id",
            postgresql_where=text("status = 'pending' AND lease_until IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger(), primary_key=True, autoincrement=True)
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    outbox_id: Mapped[int] = mapped_column(
        BigInteger(), ForeignKey("event_outbox.id", ondelete="CASCADE")
    )
    webhook_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    order_key: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = _created()
    lease_until: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created()
    finished_at: Mapped[datetime | None]
    given_up_reason: Mapped[str | None] = mapped_column(String(64))


class WebhookAttempt(Base):
    """One try of a delivery: what came back and how long it took (no response body)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery_id", "delivery_id"),)

    id: Mapped[int] = mapped_column(BigInteger(), primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        BigInteger(), ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    attempted_at: Mapped[datetime] = _created()
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(300))


ERROR_LENGTH = 300
