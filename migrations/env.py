"""Alembic environment: one advisory lock, bounded lock waits, a transaction per migration.

Run through ``orchestrator db upgrade`` (or ``alembic`` with ``alembic.ini``); the URL
comes from ``ORCHESTRATOR_DATABASE_URL`` unless the caller set ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from orchestrator.config import load_settings
from orchestrator.db import Base, Database
from orchestrator.db.compatibility import TABLE as COMPATIBILITY_TABLE
from orchestrator.webhooks import models as _webhook_models  # noqa: F401 - `alembic check`

MIGRATION_LOCK_ID = 0x5E5510  # pg_advisory_lock key: two migration jobs never overlap

config = context.config
target_metadata = Base.metadata


def _include_object(
    _obj: object, name: str | None, kind: str, _reflected: bool, _to: object
) -> bool:
    """Alembic's bookkeeping of the compatibility window is no model (`alembic check`)."""
    return not (kind == "table" and name == COMPATIBILITY_TABLE)


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url or load_settings().effective_database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    database = Database(_url(), pool_size=1)
    try:
        with database.engine.connect() as connection:
            connection.execute(text("SET lock_timeout = '10s'"))
            connection.execute(text("SET statement_timeout = '5min'"))
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
            connection.commit()
            try:
                context.configure(
                    connection=connection,
                    target_metadata=target_metadata,
                    transaction_per_migration=True,
                    compare_server_default=True,
                    include_object=_include_object,
                )
                with context.begin_transaction():
                    context.run_migrations()
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
                connection.commit()
    finally:
        database.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
