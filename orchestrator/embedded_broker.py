"""The embedded broker: kombu's SQLAlchemy transport on an SQLite file, polled every 0.1 s.

kombu passes every transport option of this transport to ``create_engine``, so the polling
interval cannot be set as an option; a subclass sets it instead.
"""

from __future__ import annotations

from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport

POLLING_INTERVAL_SECONDS = 0.1


class EmbeddedTransport(SQLAlchemyTransport):
    polling_interval = POLLING_INTERVAL_SECONDS
