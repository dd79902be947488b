"""One line for each error an operator can fix (a setting, the database, the broker, the
vendor, a migration revision), so the command line never answers them with a traceback.
Anything else is a bug and keeps its traceback."""

from __future__ import annotations

from orchestrator.config import ConfigError

UPGRADE_HINT = "run `orchestrator db upgrade`"
# SQLSTATEs of a schema that is missing or older than the code: undefined table, function,
# column.
NOT_MIGRATED = frozenset({"42P01", "42883", "42703"})


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


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
    return f"database (ORCHESTRATOR_DATABASE_URL): {_first_line(original)}"


def describe(error: BaseException) -> str | None:  # noqa: PLR0911 - one return per kind
    """The line to print for ``error``, or None if it is not an infrastructure error."""
    if isinstance(error, ConfigError):
        return str(error)
    line = _database_error(error)
    if line is not None:
        return line
    from alembic.util.exc import CommandError
    from kombu.exceptions import OperationalError as BrokerError

    from orchestrator.deepbrain.errors import DeepBrainError
    from orchestrator.messaging import TopologyMismatch
    from orchestrator.producer import PublishError

    if isinstance(error, TopologyMismatch):
        return str(error)
    if isinstance(error, BrokerError | PublishError):
        return f"broker (ORCHESTRATOR_BROKER_URL): {_first_line(error)}"
    if isinstance(error, CommandError):
        return f"migration: {_first_line(error)}"
    if isinstance(error, DeepBrainError):
        return f"DeepBrain API (ORCHESTRATOR_DEEPBRAIN_BASE_URL): {_first_line(error)}"
    return None
