"""Engine and session factory (PostgreSQL through psycopg 3), and after-commit signals."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SIGNALS_KEY = "orchestrator.after_commit_signals"
logger = logging.getLogger(__name__)


def signal_after_commit(session: Session, name: str) -> None:
    """Ask :meth:`Database.transaction` to call the ``name`` listeners once this commits."""
    session.info.setdefault(SIGNALS_KEY, set()).add(name)


def normalize_database_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class Database:
    """Owns the engine; ``transaction()`` is the one way code opens a unit of work."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int | None = None,
        pool_timeout: float = 30.0,
        echo: bool = False,
    ) -> None:
        self.url = normalize_database_url(url)
        # No pool pre-ping: it cost a round trip on every transaction (~7% of a busy worker's
        # CPU). After a database restart the first statement on a stale connection fails as a
        # disconnect, SQLAlchemy then discards every pooled connection, and the caller retries
        # (tasks: ``retry_when_database_is_away``; sweeps: the next beat).
        # SQL parameters carry request payloads (the customer's LLM keys until a start is
        # recorded): they must never reach exception texts, logs or spans.
        self.engine = create_engine(
            self.url,
            echo=echo,
            hide_parameters=True,
            pool_size=pool_size,
            max_overflow=pool_size if max_overflow is None else max_overflow,
            pool_timeout=pool_timeout,
            pool_recycle=1800,
            connect_args={"connect_timeout": 10, "application_name": "session-orchestrator"},
        )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._listeners: dict[str, list[Callable[[], None]]] = {}

    def on_commit(self, name: str, listener: Callable[[], None]) -> None:
        """Run ``listener`` after every commit that raised signal ``name``."""
        self._listeners.setdefault(name, []).append(listener)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A short transaction: commits on success, rolls back on error, always closes.

        Signals raised inside (``signal_after_commit``) reach their listeners after the commit.
        """
        with self._sessions.begin() as session:
            yield session
        for name in session.info.pop(SIGNALS_KEY, ()):
            self.signal(name)

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection where each statement commits on its own: for a statement that is a
        whole transaction, so the server holds its locks only while it runs (no round trip
        back to this process, which may wait for the GIL, before the commit)."""
        with self.engine.connect() as connection:
            yield connection.execution_options(isolation_level="AUTOCOMMIT")

    def durability_barrier(self) -> None:
        """Return once everything committed so far is on disk.

        A transaction that wrote WAL commits with a flush (``synchronous_commit`` is on by
        default), and the flush covers every earlier commit — among them claims committed
        asynchronously. The smallest such write is a logical WAL message (any role may emit
        one, at any ``wal_level``); a transaction that only took an id would commit without a
        flush. Call it before acknowledging a message that relies on an asynchronous commit.
        """
        with self.autocommit() as connection:
            connection.execute(
                text("SELECT pg_logical_emit_message(true, 'orchestrator.barrier', '')")
            )

    def signal(self, name: str) -> None:
        """Call the ``name`` listeners now (after a commit made outside ``transaction()``)."""
        for listener in self._listeners.get(name, ()):
            try:
                listener()
            except Exception:  # the commit stands; a listener must not undo the caller's work
                logger.exception("after-commit listener for %r failed", name)

    def dispose(self) -> None:
        self.engine.dispose()
