"""Database: typed models, engine set-up and the transactions the lifecycle needs."""

from orchestrator.db.engine import Database, normalize_database_url
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
)

__all__ = [
    "LIVE_STATUSES",
    "TERMINAL_STATUSES",
    "Base",
    "Database",
    "EarlyStop",
    "EventKind",
    "OutboxEvent",
    "SessionEvent",
    "SessionRow",
    "SessionStatus",
    "SweepLease",
    "normalize_database_url",
]
