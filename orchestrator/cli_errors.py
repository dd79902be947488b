"""One line for each error an operator can fix (a setting, the database, the broker, the
vendor, a migration revision), so the command line never answers them with a traceback.
Our own errors say how they are shown (:class:`orchestrator.errors.OrchestratorError`);
the third-party ones an operator meets are mapped here. Anything else is a bug and keeps its
traceback."""

from __future__ import annotations

from orchestrator.errors import OrchestratorError, first_line

UPGRADE_HINT = "run `orchestrator db upgrade`"
# SQLSTATEs of a schema that is missing or older than the code: undefined table, function,
# column.
NOT_MIGRATED = frozenset({"42P01", "42883", "42703"})


def _database_error(error: BaseException) -> str | None:
    from sqlalchemy.exc import DBAPIError

    if not isinstance(error, DBAPIError):
        return None
    original = error.orig
    if original is None or not type(original).__module__.startswith("psycopg"):
        return None  # e.g. the embedded broker's SQLite: not the database
    if getattr(original, "sqlstate", None) in NOT_MIGRATED:
        return f"the database has no tables of this version (yet): {UPGRADE_HINT}"
    # psycopg's own message names host and port, never the password.
    return f"database (ORCHESTRATOR_DATABASE_URL): {first_line(original)}"


def describe(error: BaseException) -> str | None:
    """The line to print for ``error``, or None if it is not an infrastructure error."""
    if isinstance(error, OrchestratorError):
        return error.operator_line()
    line = _database_error(error)
    if line is not None:
        return line
    from alembic.util.exc import CommandError
    from kombu.exceptions import OperationalError as BrokerError

    if isinstance(error, BrokerError):
        return f"broker (ORCHESTRATOR_BROKER_URL): {first_line(error)}"
    if isinstance(error, CommandError):
        return f"migration: {first_line(error)}"
    return None
