"""Typed SQLAlchemy 2 models for ``sessions`` and ``session_events`` (their names are a
contract admins rely on: docs/admin.md)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Annotated, Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from orchestrator.db.types import JSONDocument, UTCDateTime, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class SessionStatus(enum.StrEnum):
    WAITING = "waiting"
    STARTING = "starting"
    ACTIVE = "active"
    STOPPING = "stopping"
    ENDED = "ended"
    FAILED = "failed"


class EventKind(enum.StrEnum):
    CREATED = "created"
    ADMITTED = "admitted"
    BACK_TO_WAITING = "back_to_waiting"
    START_ATTEMPT = "start_attempt"
    ACTIVE = "active"
    STOP_REQUESTED = "stop_requested"
    STOP_ATTEMPT_FAILED = "stop_attempt_failed"
    ENDED = "ended"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    DUPLICATE_CONFLICT = "duplicate_conflict"
    COMPENSATED = "compensated"
    ORPHAN_STOPPED = "orphan_stopped"
    STOP_BEFORE_START = "stop_before_start"  # remembered in early_stops (no row yet)
    REDISPATCHED = "redispatched"  # an admitted start whose dispatch was lost, sent again
    # The first time the reconciler saw, in the vendor's list, a session no row knows and the
    # vendor gave no usable creation time for: the orphan grace runs from here.
    VENDOR_SESSION_SEEN = "vendor_session_seen"
    # An account the vendor refused the key of, disabled until an operator enables it (no
    # session: ``detail`` names the account).
    ACCOUNT_DISABLED = "account.disabled"


RARE_EVENT_KINDS = (
    "kind IN ('orphan_stopped', 'compensated', 'duplicate_conflict', 'stop_attempt_failed')"
)
LIVE_STATUSES = (SessionStatus.STARTING, SessionStatus.ACTIVE, SessionStatus.STOPPING)
TERMINAL_STATUSES = (SessionStatus.ENDED, SessionStatus.FAILED)

Timestamp = Annotated[datetime, mapped_column(UTCDateTime())]
CreatedAt = Annotated[
    datetime, mapped_column(UTCDateTime(), default=utcnow, server_default=text("CURRENT_TIMESTAMP"))
]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: UTCDateTime(),
        dict[str, Any]: JSONDocument,
    }


def _status_check(values: tuple[str, ...]) -> str:
    return "status IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class SessionRow(Base):
    """One row per start request (``request_id`` unique), from enqueue to its end."""

    __tablename__ = "sessions"
    __table_args__ = (
        CheckConstraint(_status_check(tuple(s.value for s in SessionStatus)), name="status"),
        # The reaper's sweep: cost follows the live set, not the table.
        Index(
            "ix_sessions_active_expires_at",
            "expires_at",
            postgresql_where=text("status = 'active'"),
        ),
        Index(
            "ix_sessions_stopping_stop_retry_at",
            "stop_retry_at",
            postgresql_where=text("status = 'stopping'"),
        ),
        Index(
            "ix_sessions_waiting_created_at",
            "created_at",
            postgresql_where=text("status = 'waiting'"),
        ),
        # A tenant's oldest waiting requests (admission by tenant, migration 0009).
        Index(
            "ix_sessions_waiting_tenant_created_at",
            "tenant",
            "created_at",
            "id",
            postgresql_where=text("status = 'waiting'"),
        ),
        Index("ix_sessions_status_created_at", "status", "created_at"),
        Index("ix_sessions_started_at", "started_at"),
        Index("ix_sessions_avatar_id", "avatar_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    request_id: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    avatar_id: Mapped[str | None] = mapped_column(Text)
    request_payload: Mapped[dict[str, Any]]
    payload_sha256: Mapped[str] = mapped_column(String(64))
    claim_id: Mapped[str | None] = mapped_column(String(255))
    vendor_session_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    voice_id: Mapped[str | None] = mapped_column(Text)
    livekit_url: Mapped[str | None] = mapped_column(Text)
    livekit_room: Mapped[str | None] = mapped_column(Text)
    livekit_token: Mapped[str | None] = mapped_column(Text)
    livekit_token_expires_at: Mapped[datetime | None]
    granted_max_duration_minutes: Mapped[int | None] = mapped_column(Integer)
    max_session_numbers: Mapped[int | None] = mapped_column(Integer)
    max_duration_seconds: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[CreatedAt]
    start_deadline_at: Mapped[datetime | None]
    start_sent_at: Mapped[datetime | None]
    # When the row last went ``starting`` (admitted at once or from ``waiting``): the start
    # timeout runs from here, not from ``created_at``.
    admitted_at: Mapped[datetime | None]
    # The lease on the vendor attempt in progress: one attempt at a time, whatever the broker
    # redelivers. ``attempt_owner`` is the attempt's own id, not the message's.
    attempt_owner: Mapped[str | None] = mapped_column(String(64))
    attempt_lease_until: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    stop_requested_at: Mapped[datetime | None]
    stop_retry_at: Mapped[datetime | None]
    stop_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    ended_at: Mapped[datetime | None]
    end_reason: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    traceparent: Mapped[str | None] = mapped_column(String(128))
    session_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONDocument)
    # The vendor account the row is admitted to (every later vendor call uses its key); a
    # request waiting for any eligible account has none yet (docs/admission.md).
    account: Mapped[str | None] = mapped_column(String(64), server_default="default")
    requested_account: Mapped[str | None] = mapped_column(String(64))
    requested_labels: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    # The last start attempt that failed uncertainly (5xx, timeout): the request is not moved
    # to another account before its own account's list was read after this.
    uncertain_at: Mapped[datetime | None]
    # The tenant whose guarantees, maximum and waiting cap apply (docs/admission.md).
    tenant: Mapped[str] = mapped_column(String(64), server_default="default")


class SessionEvent(Base):
    """Append-only log of what happened; ``session_id`` is null for an orphan with no row."""

    __tablename__ = "session_events"
    __table_args__ = (
        Index("ix_session_events_session_id_id", "session_id", "id"),
        # Operators' queries for rare kinds (orphans, compensations, conflicts, failing stops).
        Index(
            "ix_session_events_rare_kind_occurred_at",
            "kind",
            "occurred_at",
            postgresql_where=text(RARE_EVENT_KINDS),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger(), primary_key=True, autoincrement=True)
    session_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("sessions.id", ondelete="SET NULL")
    )
    vendor_session_id: Mapped[str | None] = mapped_column(String(255), index=True)
    occurred_at: Mapped[CreatedAt]
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)


class OutboxEvent(Base):
    """A lifecycle event written in the transaction that caused it, published after commit."""

    __tablename__ = "event_outbox"
    __table_args__ = (
        Index(
            "ix_event_outbox_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
        ),
        # The webhook sender's backlog (migration 0008): events not yet made deliveries.
        Index(
            "ix_event_outbox_webhooks_pending",
            "id",
            postgresql_where=text("webhooks_fanned_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger(), primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(unique=True, default=uuid.uuid4)
    routing_key: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    created_at: Mapped[CreatedAt]
    published_at: Mapped[datetime | None]
    traceparent: Mapped[str | None] = mapped_column(String(128))
    # When the webhook sender made the event's deliveries (orchestrator/webhooks/fanout.py).
    webhooks_fanned_at: Mapped[datetime | None]


class EarlyStop(Base):
    """A stop that arrived before its start (they travel on different queues): the start, when
    it comes, ends the request without calling the vendor. Kept until then, or for
    ``ORCHESTRATOR_EARLY_STOP_RETENTION_SECONDS``."""

    __tablename__ = "early_stops"

    request_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64))
    requested_at: Mapped[CreatedAt]


class SweepLease(Base):
    """One sweep of a kind at a time across the deployment (the reconciler's pass), timed by
    the database's clock; no connection is held while the sweep calls the vendor."""

    __tablename__ = "sweep_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class VendorAccount(Base):
    """One row per vendor account: what admission reads (docs/admission.md), never a secret.

    ``reported_limit`` is the vendor's last ``max_session_numbers`` (a trigger on ``sessions``
    writes it when a start reports another value). ``in_use`` and ``waiting`` are kept exact
    by triggers on ``sessions`` (migration 0007); ``effective_cap`` is computed by Postgres.
    ``configured_cap``, ``weight``, ``labels`` and ``in_catalog`` are synced from the account
    catalog; ``enabled``/``draining`` are the operator's; the rest is the account's health."""

    __tablename__ = "vendor_accounts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True, server_default="default")
    reported_limit: Mapped[int | None] = mapped_column(Integer)
    reported_at: Mapped[datetime | None]
    configured_cap: Mapped[int | None] = mapped_column(Integer)
    limited_cap: Mapped[int | None] = mapped_column(Integer)
    effective_cap: Mapped[int | None] = mapped_column(
        Integer, Computed("least(configured_cap, nullif(reported_limit, 0), limited_cap)")
    )
    in_use: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    waiting: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    weight: Mapped[float] = mapped_column(Float, server_default=text("1"))
    labels: Mapped[dict[str, Any]] = mapped_column(JSONDocument, server_default=text("'{}'"))
    in_catalog: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    draining: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    disabled_reason: Mapped[str | None] = mapped_column(String(200))
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    circuit_open_until: Mapped[datetime | None]
    circuit_cooldown_seconds: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(String(500))
    last_error_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None]


class Tenant(Base):
    """A tenant's admission policy (docs/admission.md, "Tenants"), set with
    ``orchestrator tenants set``; a tenant without a row has the default policy."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    guaranteed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    maximum: Mapped[int | None] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Float, server_default=text("1"))
    reserved: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_waiting: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime | None] = mapped_column(server_default=func.now())


class TenantUsage(Base):
    """0009's per-tenant counters, no longer kept from migration 0012 on (its rows emptied;
    the table stays for expand/contract): read ``tenant_totals`` (the sums of
    :class:`TenantAccountUsage`) instead."""

    __tablename__ = "tenant_usage"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    in_use: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    waiting: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    used_seconds: Mapped[float] = mapped_column(Float, server_default=text("0"))
    used_at: Mapped[datetime | None] = mapped_column(server_default=func.now())


class TenantAccountUsage(Base):
    """One tenant's counters on one account (``''``: its waiting requests bound to none),
    kept exact by the triggers on ``sessions`` (migration 0012, replacing ``tenant_usage``'s
    upkeep); the view ``tenant_totals`` sums them per tenant."""

    __tablename__ = "tenant_account_usage"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    account: Mapped[str] = mapped_column(String(64), primary_key=True)
    in_use: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    waiting: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    used_seconds: Mapped[float] = mapped_column(Float, server_default=text("0"))
    used_at: Mapped[datetime | None] = mapped_column(server_default=func.now())


class WaitEstimate(Base):
    """A waiting request's latest wait estimate and what its last ``session.waiting`` event
    said (migration 0011; docs/admission.md, "The expected wait"). No foreign key: its check
    would lock the waiting row admission takes with ``SKIP LOCKED``."""

    __tablename__ = "wait_estimates"

    session_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    #: Seconds from ``estimated_at``; None: no end in sight within the look-ahead.
    p50_seconds: Mapped[float | None] = mapped_column(Float)
    p90_seconds: Mapped[float | None] = mapped_column(Float)
    estimated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None]
    #: When the last event expected the admission (None: infinite).
    sent_p50_at: Mapped[datetime | None]
    sent_p90_at: Mapped[datetime | None]
    sent_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
