"""Alembic: up, down and up again on a fresh Postgres; models and migrations agree."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from orchestrator.db.engine import normalize_database_url
from orchestrator.db.migrate import check, downgrade, upgrade
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.postgres
TABLES = {
    "sessions",
    "session_events",
    "event_outbox",
    "early_stops",
    "sweep_leases",
    "schema_compatibility",
}


def tables(url: str) -> set[str]:
    engine = create_engine(normalize_database_url(url))
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_up_down_up_on_postgres() -> None:
    with fresh_postgres_database("orch_migrate") as url:
        upgrade(url)
        assert tables(url) == TABLES
        downgrade(url, "base")
        assert tables(url) == set()
        upgrade(url)
        assert tables(url) == TABLES
        check(url)  # raises if the models and the migrations disagree


def test_live_session_index_is_partial(database_url: str) -> None:
    engine = create_engine(normalize_database_url(database_url))
    try:
        with engine.connect() as conn:
            definition = conn.exec_driver_sql(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_sessions_active_expires_at'"
            ).scalar_one()
    finally:
        engine.dispose()
    assert "WHERE" in definition and "'active'" in definition
