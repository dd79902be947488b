"""Database: typed models, engine set-up and the transactions the lifecycle needs."""

from orchestrator.db.engine import Database, normalize_database_url
from orchestrator.db.models import (
    LIVE_STATUSES,
    TERMINAL_STATUSES,
    Base,
    EventKind,
    OutboxEvent,
    SessionEvent,
    SessionRow,
    SessionStatus,
)

__all__ = [
    "LIVE_STATUSES",
    "TERMINAL_STATUSES",
    "Base",
    "Database",
    "EventKind",
    "OutboxEvent",
    "SessionEvent",
    "SessionRow",
    "SessionStatus",
    "normalize_database_url",
]
