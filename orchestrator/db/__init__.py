"""Database: typed models, engine set-up and the transactions the lifecycle needs."""

from orchestrator.db.engine import (
    AfterCommit,
    CommitHooks,
    Database,
    after_commit,
    normalize_database_url,
)
from orchestrator.db.models import (
    LIVE_STATUSES,
    TERMINAL_STATUSES,
    Base,
    EarlyStop,
    EventKind,
    OutboxEvent,
    SessionEvent,
    SessionRow,
    SessionStatus,
    SweepLease,
    Tenant,
    TenantAccountUsage,
    TenantUsage,
    VendorAccount,
    WaitEstimate,
)

__all__ = [
    "LIVE_STATUSES",
    "TERMINAL_STATUSES",
    "AfterCommit",
    "Base",
    "CommitHooks",
    "Database",
    "EarlyStop",
    "EventKind",
    "OutboxEvent",
    "SessionEvent",
    "SessionRow",
    "SessionStatus",
    "SweepLease",
    "Tenant",
    "TenantAccountUsage",
    "TenantUsage",
    "VendorAccount",
    "WaitEstimate",
    "after_commit",
    "normalize_database_url",
]
