"""Column types: ``timestamptz`` that refuses naive datetimes, and JSON stored as ``jsonb``."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Dialect, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB


class UTCDateTime(TypeDecorator[datetime]):
    """``timestamptz``; a naive datetime is refused rather than read in the server's zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a timestamptz column")
        return value


JSONDocument = JSONB()


def utcnow() -> datetime:
    return datetime.now(UTC)
