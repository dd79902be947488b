"""Alembic: up, down and up again on a fresh Postgres; models and migrations agree; each
migration only expands what the previous revision had (docs/operations.md, "Upgrades")."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from sqlalchemy import create_engine, inspect

from orchestrator.db.engine import normalize_database_url
from orchestrator.db.migrate import alembic_config, check, downgrade, upgrade
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.postgres
MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
TABLES = {
    "sessions",
    "session_events",
    "event_outbox",
    "early_stops",
    "sweep_leases",
    "schema_compatibility",
    "vendor_accounts",
    "webhook_endpoints",
    "webhook_secrets",
    "webhook_deliveries",
    "webhook_attempts",
    "tenants",
    "tenant_usage",
    "tenant_account_usage",
    "wait_estimates",
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


def removes(script: Script) -> dict[str, str]:
    """A contract step's ``REMOVES``: each object it drops or changes, with why the releases it
    still serves do not use it. Empty for an expansion."""
    return dict(getattr(script.module, "REMOVES", {}))


def check_expansions(url: str, config: Config) -> None:
    """Each migration of ``config``, applied on top of the previous revision: every table,
    view, column and function signature the previous revision had is still there, unchanged
    (views and function bodies by digest), no existing table gained a column that needs a
    value, and downgrade leaves the previous revision's catalog exactly. Only what a migration
    lists in ``REMOVES`` may go; a removal (not a compatible body change) must also raise the
    window."""
    order = list(reversed(list(ScriptDirectory.from_config(config).walk_revisions())))
    ids = [s.revision for s in order]
    before: dict[str, str] = {}
    for script in order:
        tables = {k.removeprefix("table ") for k in before if k.startswith("table ")}
        required_before = required_columns(url, tables)
        command.upgrade(config, script.revision)
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
            assert oldest in ids, f"{script.revision} serves from {oldest}, not a revision"
            assert ids.index(oldest) >= ids.index(previous), (
                f"{script.revision} serves from {oldest}, before {previous}: a window"
                " never goes back"
            )
            if gone:
                assert ids.index(oldest) > ids.index(previous), (
                    f"{script.revision} removes {sorted(gone)} but still serves {previous}"
                )
        command.downgrade(config, str(script.down_revision or "base"))
        assert catalog(url) == before, f"{script.revision}: downgrade left another schema"
        command.upgrade(config, script.revision)
        before = after


def test_each_migration_keeps_what_the_previous_revision_had() -> None:
    with fresh_postgres_database("orch_expand") as url:
        check_expansions(url, alembic_config(url))


# A later migration on top of this head, to show that the check above refuses what breaks
# the previous release and accepts a declared contract step.
SYNTHETIC = """
import sqlalchemy as sa
from alembic import op

from orchestrator.db.compatibility import declare, withdraw

revision = "9006"
down_revision = {head!r}
branch_labels = None
depends_on = None
REMOVES = {removes!r}


def upgrade() -> None:
    {upgrade}
    if {declares!r}:
        declare(revision, down_revision, oldest_served={oldest!r})


def downgrade() -> None:
    withdraw(revision)
    {downgrade}
"""
OWNER = "column sessions.attempt_owner character varying"
DROP = 'op.drop_column("sessions", "attempt_owner")'
ADD_BACK = 'op.add_column("sessions", sa.Column("attempt_owner", sa.String(64)))'
WHY = "every release this schema serves leaves it unused"


@pytest.mark.parametrize(
    ("upgrade_sql", "downgrade_sql", "removed", "oldest", "declares", "refused"),
    [
        (DROP, ADD_BACK, {}, "PREVIOUS", True, "drops or changes what the previous release uses"),
        (
            'op.alter_column("sessions", "attempt_owner", new_column_name="attempt_holder")',
            'op.alter_column("sessions", "attempt_holder", new_column_name="attempt_owner")',
            {},
            "PREVIOUS",
            True,
            "drops or changes what the previous release uses",
        ),
        (
            'op.add_column("sessions", sa.Column("note", sa.Text(), nullable=False))',
            'op.drop_column("sessions", "note")',
            {},
            "PREVIOUS",
            True,
            "adds columns an older INSERT cannot fill",
        ),
        (DROP, ADD_BACK, {OWNER: WHY}, "PREVIOUS", True, "but still serves"),
        (
            'op.add_column("sessions", sa.Column("note", sa.Text()))',
            'op.drop_column("sessions", "note")',
            {},
            "PREVIOUS",
            False,
            "did not call declare",
        ),
        (DROP, ADD_BACK, {OWNER: WHY}, "9006", True, None),  # a contract step, declared
        (
            'op.add_column("sessions", sa.Column("note", sa.Text()))',
            'op.drop_column("sessions", "note")',
            {},
            "PREVIOUS",
            True,
            None,  # an expansion
        ),
    ],
    ids=[
        "drop",
        "rename",
        "required-column",
        "contract-same-window",
        "no-declare",
        "contract",
        "expand",
    ],
)
def test_the_expansion_check_refuses_what_breaks_the_previous_release(
    tmp_path: Path,
    upgrade_sql: str,
    downgrade_sql: str,
    removed: dict[str, str],
    oldest: str,
    declares: bool,
    refused: str | None,
) -> None:
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    with fresh_postgres_database("orch_contract") as url:
        config = alembic_config(url)
        head = ScriptDirectory.from_config(config).get_current_head()
        command.upgrade(config, "head")
        previous = windows(url)[str(head)]
        command.downgrade(config, "base")
        (scripts / "versions" / "9006_synthetic.py").write_text(
            SYNTHETIC.format(
                head=head,
                removes=removed,
                upgrade=upgrade_sql,
                downgrade=downgrade_sql,
                declares=declares,
                oldest=previous if oldest == "PREVIOUS" else oldest,
            )
        )
        config.set_main_option("script_location", str(scripts))
        if refused is None:
            check_expansions(url, config)
        else:
            with pytest.raises(AssertionError, match=refused):
                check_expansions(url, config)
