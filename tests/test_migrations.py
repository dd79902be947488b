"""Alembic: up, down and up again on a fresh Postgres; models and migrations agree; each
migration only expands what the previous revision had (docs/operations.md, "Upgrades")."""

from __future__ import annotations

import psycopg
import pytest
from alembic.script import Script, ScriptDirectory
from sqlalchemy import create_engine, inspect

from orchestrator.db.engine import normalize_database_url
from orchestrator.db.migrate import alembic_config, check, downgrade, upgrade
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


# --- expand/contract: what the previous revision had is still there (docs/operations.md) ---

CATALOG = """
SELECT 'table ' || table_name, '' FROM information_schema.tables
 WHERE table_schema = 'public' AND table_type = 'BASE TABLE'
UNION ALL
SELECT 'view ' || table_name, md5(view_definition) FROM information_schema.views
 WHERE table_schema = 'public'
UNION ALL
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type, '' FROM
 information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'function ' || p.oid::regprocedure::text || ' -> ' || pg_get_function_result(p.oid),
       md5(p.prosrc)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
"""
BOOKKEEPING = ("table alembic_version", "column alembic_version.")
# A column an older release's INSERT does not name must not need a value.
NEW_REQUIRED_COLUMNS = """
SELECT table_name || '.' || column_name FROM information_schema.columns
 WHERE table_schema = 'public' AND is_nullable = 'NO' AND column_default IS NULL
   AND is_identity = 'NO' AND table_name = ANY(%s)
"""


def catalog(url: str) -> dict[str, str]:
    """Every table, view, column (with its type) and function signature of the schema, with
    a digest of each view's and function's definition."""
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        rows = conn.execute(CATALOG).fetchall()
    return {key: digest for key, digest in rows if not key.startswith(BOOKKEEPING)}


def required_columns(url: str, tables: set[str]) -> set[str]:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        return {row[0] for row in conn.execute(NEW_REQUIRED_COLUMNS, (sorted(tables),))}


def windows(url: str) -> dict[str, str]:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        if conn.execute("SELECT to_regclass('schema_compatibility')").fetchone() == (None,):
            return {}
        rows = conn.execute("SELECT revision, oldest_served_revision FROM schema_compatibility")
        return dict(rows.fetchall())


def revisions_in_order(url: str) -> list[Script]:
    return list(reversed(list(ScriptDirectory.from_config(alembic_config(url)).walk_revisions())))


def removes(script: Script) -> dict[str, str]:
    """A contract step's ``REMOVES``: each object it drops or changes, with why the releases it
    still serves do not use it. Empty for an expansion."""
    return dict(getattr(script.module, "REMOVES", {}))


def test_each_migration_keeps_what_the_previous_revision_had() -> None:
    """Each migration, applied on top of the previous revision: every table, view, column and
    function signature the previous revision had is still there, unchanged (views and function
    bodies by digest), no existing table gained a column that needs a value, and downgrade
    leaves the previous revision's catalog exactly. Only what a migration lists in ``REMOVES``
    may go; a removal (not a compatible body change) must also raise the window."""
    with fresh_postgres_database("orch_expand") as url:
        order = revisions_in_order(url)
        ids = [s.revision for s in order]
        before: dict[str, str] = {}
        for script in order:
            tables = {k.removeprefix("table ") for k in before if k.startswith("table ")}
            required_before = required_columns(url, tables)
            upgrade(url, script.revision)
            after = catalog(url)
            gone = {k for k in before if k not in after}
            changed = {k for k in before if k in after and after[k] != before[k]}
            declared = removes(script)
            undeclared = sorted((gone | changed) - set(declared))
            assert not undeclared, (
                f"migration {script.revision} drops or changes what the previous release uses"
                f" and does not declare it a contract step (REMOVES): {undeclared}"
            )
            assert set(declared) <= gone | changed, f"{script.revision}: stale REMOVES"
            new_required = required_columns(url, tables) - required_before
            assert not new_required, (
                f"migration {script.revision} adds columns an older INSERT cannot fill:"
                f" {sorted(new_required)} (give them a server default or make them nullable)"
            )
            window = windows(url)
            if ids.index(script.revision) >= ids.index("0005"):
                assert script.revision in window, f"{script.revision} did not call declare()"
                previous = window.get(str(script.down_revision), str(script.down_revision))
                oldest = window[script.revision]
                assert ids.index(oldest) >= ids.index(previous), (
                    f"{script.revision} serves from {oldest}, before {previous}: a window"
                    " never goes back"
                )
                if gone:
                    assert ids.index(oldest) > ids.index(previous), (
                        f"{script.revision} removes {sorted(gone)} but still serves {previous}"
                    )
            downgrade(url, str(script.down_revision or "base"))
            assert catalog(url) == before, f"{script.revision}: downgrade left another schema"
            upgrade(url, script.revision)
            before = after
