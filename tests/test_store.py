"""The Python side of the store and the SQL functions its migrations define agree: one lock
key, one set of live statuses, one migration that defines the claim."""

from __future__ import annotations

import re
from importlib import import_module
from pathlib import Path

import pytest
from sqlalchemy import text

from orchestrator.db import LIVE_STATUSES, Database
from orchestrator.store import ADMISSION_LOCK_KEY, CLAIM_FUNCTION_MIGRATION
from orchestrator.store.admission import request_lock_sql

VERSIONS = Path(__file__).resolve().parents[1] / "migrations" / "versions"


def migration(revision: str) -> object:
    (path,) = VERSIONS.glob(f"{revision}_*.py")
    return import_module(f"orchestrator.migrations.versions.{path.stem}")


def defining(function: str) -> list[str]:
    """Revisions whose upgrade creates ``function``."""
    return sorted(
        p.name[:4]
        for p in VERSIONS.glob("0*.py")
        if re.search(rf"CREATE (OR REPLACE )?FUNCTION {function}\(", p.read_text())
    )


def test_the_claim_is_defined_by_the_migration_the_store_names() -> None:
    assert defining("orchestrator_claim")[-1] == CLAIM_FUNCTION_MIGRATION
    claim_sql = migration(CLAIM_FUNCTION_MIGRATION).CLAIM  # type: ignore[attr-defined]
    assert f"pg_advisory_xact_lock({ADMISSION_LOCK_KEY})" in claim_sql  # a mixed fleet's
    assert request_lock_sql("p_request_id") in claim_sql  # the one a stop takes too


def test_the_admission_count_uses_the_live_statuses_of_the_models() -> None:
    live = ", ".join(f"'{status.value}'" for status in LIVE_STATUSES)
    for revision in defining("orchestrator_admission_state"):  # every version still defined
        sql = migration(revision).ADMISSION_STATE  # type: ignore[attr-defined]
        assert f"status IN ({live})" in sql, revision


@pytest.mark.postgres
def test_the_database_runs_what_the_migrations_say(db: Database) -> None:
    # Every version of the claim (the previous release's is kept beside the current one
    # during an upgrade) takes the one admission lock.
    with db.engine.connect() as connection:
        bodies = (
            connection.execute(
                text(
                    "SELECT pg_get_functiondef(p.oid) FROM pg_proc p"
                    " WHERE p.proname = 'orchestrator_claim'"
                )
            )
            .scalars()
            .all()
        )
    assert len(bodies) >= 2
    for body in bodies:
        assert f"pg_advisory_xact_lock({ADMISSION_LOCK_KEY})" in body
