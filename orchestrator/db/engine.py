"""Engine and session factory (PostgreSQL through psycopg 3), and after-commit signals."""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

HOOKS_KEY = "orchestrator.after_commit"
logger = logging.getLogger(__name__)


class AfterCommit(enum.Enum):
    """What a committed transaction tells the layer above (see :class:`CommitHooks`)."""

    SLOT_FREED = "a live session ended: a waiting request may be admitted"
    EVENTS_PENDING = "the outbox has events to relay"


class CommitHooks(Protocol):
    """The layer above's answer to :class:`AfterCommit`, given to :class:`Database` when it
    is made (the lifecycle's: ``lifecycle.context.DispatchAfterCommit``); each hook is told
    the database whose commit asked for it."""

    def slot_freed(self, db: Database) -> None: ...

    def events_pending(self, db: Database) -> None: ...


class _NoHooks:
    """Nothing to do after a commit: a database no lifecycle runs on (the producer, tools)."""

    def slot_freed(self, db: Database) -> None:
        pass

    def events_pending(self, db: Database) -> None:
        pass


def after_commit(session: Session, hook: AfterCommit) -> None:
    """Have :meth:`Database.transaction` fire ``hook`` once this session's transaction commits
    (not at all if it rolls back)."""
    session.info.setdefault(HOOKS_KEY, set()).add(hook)


# A caller's own bound on the wait for a pooled connection (Database.waits_at_most).
_WAIT_BOUND: ContextVar[float | None] = ContextVar("orchestrator_pool_wait_bound", default=None)
MIN_POOL_WAIT_SECONDS = 0.01


class BoundedWaitPool(QueuePool):
    """A QueuePool whose wait for a free connection a caller may shorten for itself: the
    configured ``pool_timeout`` is the longest any checkout waits."""

    @property
    def _timeout(self) -> float:
        bound = _WAIT_BOUND.get()
        configured = self._configured_timeout
        return configured if bound is None else min(configured, bound)

    @_timeout.setter
    def _timeout(self, value: float) -> None:
        self._configured_timeout = value

    def recreate(self) -> QueuePool:
        token = _WAIT_BOUND.set(None)  # the new pool keeps the configured timeout
        try:
            return super().recreate()
        finally:
            _WAIT_BOUND.reset(token)


def normalize_database_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class Database:
    """Owns the engine; ``transaction()`` is the one way code opens a unit of work. ``hooks``
    answer what a committed transaction asks for (:func:`after_commit`); they are given here,
    once, and never replaced."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int | None = None,
        pool_timeout: float = 30.0,
        echo: bool = False,
        hooks: CommitHooks | None = None,
    ) -> None:
        self._hooks: CommitHooks = _NoHooks() if hooks is None else hooks
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
            poolclass=BoundedWaitPool,
            pool_recycle=1800,
            connect_args={"connect_timeout": 10, "application_name": "session-orchestrator"},
        )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def has_commit_hooks(self) -> bool:
        """Whether a commit here tells anyone (the lifecycle's database must)."""
        return not isinstance(self._hooks, _NoHooks)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A short transaction: commits on success, rolls back on error, always closes.

        Hooks asked for inside (:func:`after_commit`) fire after the commit.
        """
        with self._sessions.begin() as session:
            yield session
        for hook in session.info.pop(HOOKS_KEY, ()):
            self.fire(hook)

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection where each statement commits on its own: for a statement that is a
        whole transaction, so the server holds its locks only while it runs (no round trip
        back to this process, which may wait for the GIL, before the commit)."""
        with self.engine.connect() as connection:
            yield connection.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def waits_at_most(self, seconds: float) -> Iterator[None]:
        """Inside, this thread waits at most ``seconds`` for a pooled connection (a full pool
        then raises ``sqlalchemy.exc.TimeoutError`` sooner): for callers whose window is
        shorter than ``pool_timeout``."""
        token = _WAIT_BOUND.set(max(MIN_POOL_WAIT_SECONDS, seconds))
        try:
            yield
        finally:
            _WAIT_BOUND.reset(token)

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

    def fire(self, hook: AfterCommit) -> None:
        """Fire ``hook`` now (after a commit made outside ``transaction()``)."""
        try:
            if hook is AfterCommit.SLOT_FREED:
                self._hooks.slot_freed(self)
            else:
                self._hooks.events_pending(self)
        except Exception:  # the commit stands; a hook must not undo the caller's work
            logger.exception("after-commit hook failed: %s", hook.value)

    def dispose(self) -> None:
        self.engine.dispose()
