"""Checks a command makes before it relies on a part: the database's schema revision, the
broker's connection, the vendor's answer. Each returns one line (or raises an error the
command line turns into one)."""

from __future__ import annotations

from collections.abc import Callable

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from orchestrator.accounts.model import Account
from orchestrator.accounts.sources import AccountsError
from orchestrator.cli_errors import UPGRADE_HINT
from orchestrator.config import Settings
from orchestrator.db.compatibility import declarations, served
from orchestrator.db.engine import normalize_database_url
from orchestrator.db.migrate import alembic_config
from orchestrator.errors import OrchestratorError

CONNECT_TIMEOUT_SECONDS = 10


class NotMigrated(OrchestratorError):
    """The database's schema is not the revision this program needs; the message says why."""


def schema_revision(database_url: str) -> str:
    """The database's revision if this program may run on it: its own head, or a later
    revision whose compatibility window serves this head (orchestrator/db/compatibility.py);
    :class:`NotMigrated` if not. An unreachable database raises SQLAlchemy's error."""
    script = ScriptDirectory.from_config(alembic_config(database_url))
    heads = set(script.get_heads())
    engine = create_engine(
        normalize_database_url(database_url),
        poolclass=NullPool,
        hide_parameters=True,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
    )
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
            recorded = declarations(connection) if current - heads else {}
    finally:
        engine.dispose()
    if current == heads:
        return ", ".join(sorted(current))
    if not current:
        raise NotMigrated(f"the database has no tables yet: {UPGRADE_HINT}")
    known = {s.revision for s in script.walk_revisions()}
    shown, needed = ", ".join(sorted(current)), ", ".join(sorted(heads))
    if current - known:
        if len(current) == 1 and len(heads) == 1:
            why = served(next(iter(current)), next(iter(heads)), known, recorded)
            if why is None:
                return f"{shown} (serves this release's {needed})"
        else:
            why = "more than one head"
        raise NotMigrated(
            f"the database is at revision {shown}, which this program does not know"
            f" (a newer release migrated it) and {why}; this program needs {needed}"
        )
    raise NotMigrated(
        f"the database is at revision {shown}, this program needs {needed}: {UPGRADE_HINT}"
    )


def broker_reachable(settings: Settings) -> str:
    """Connect to the broker once (kombu's errors propagate); the transport's name."""
    from orchestrator.celery_publishing import publishing_app

    app = publishing_app(settings)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_SECONDS)
            return str(connection.transport_cls)
    finally:
        app.close()


def vendor_answers(settings: Settings, account: Account | None = None) -> int:
    """List the account's live sessions at the vendor (DeepBrain errors propagate): proves
    the URL, the network path and the user key. Returns how many there are. Without
    ``account``: today's single-account settings."""
    from orchestrator.deepbrain import DeepBrainClient, RetryPolicy

    if account is None:
        app_id, user_key = settings.vendor_credentials()
    else:
        app_id, user_key = account.app_id, account.user_key
    with DeepBrainClient(
        settings.deepbrain_base_url,
        app_id,
        user_key,
        timeout_seconds=settings.vendor_timeout_seconds,
        retry=RetryPolicy(max_attempts=1),
    ) as client:
        return len(client.list_sessions("active"))


def vendor_checks(settings: Settings) -> list[tuple[str, Callable[[], str]]]:
    """One check per account (``vendor NAME``), each listing that account's live sessions
    with that account's own key: a refused or mistyped key shows on its own line. If the
    accounts cannot be read, one ``vendor`` check that fails with why."""
    from orchestrator.accounts.catalog import catalog_for

    try:
        accounts = catalog_for(settings).accounts()
    except AccountsError as error:
        failure = error

        def unreadable() -> str:
            raise failure

        return [("vendor", unreadable)]

    def answers(account: Account) -> Callable[[], str]:
        return lambda: f"{vendor_answers(settings, account)} live sessions"

    return [(f"vendor {name}", answers(account)) for name, account in accounts.items()]
