"""What the lifecycle functions need, built once per process from :class:`Settings`; and what
a commit asks of the lifecycle (:class:`DispatchAfterCommit`, the database's commit hooks)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from orchestrator import store
from orchestrator.accounts import DEFAULT_ACCOUNT, catalog_for
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.deepbrain import DeepBrainClient
from orchestrator.lifecycle.dispatch import Dispatcher
from orchestrator.lifecycle.vendors import Vendors

MAX_PARALLEL_STOPS = 32


@dataclass(frozen=True)
class DispatchAfterCommit:
    """The lifecycle's answer to a commit (``db.CommitHooks``), made before the database that
    takes it: ``Database(url, hooks=DispatchAfterCommit(dispatcher))``."""

    dispatcher: Dispatcher

    def slot_freed(self, db: Database) -> None:
        """A live session ended: admit the next waiting request, if any."""
        if store.has_waiting(db):
            self.dispatcher.admit_waiting()

    def events_pending(self, db: Database) -> None:
        self.dispatcher.publish_events()


@dataclass
class Lifecycle:
    """The settings, the database, the vendor clients (one per account, :class:`Vendors`),
    and the dispatcher that hands work on (through Celery in a worker, inline in tests and
    tools): given, never looked up. ``vendor``, when given, is the client of the ``default``
    account (tests give one with their own transport); else each account's is made from the
    catalog. The database is made with the dispatcher's commit hooks
    (:class:`DispatchAfterCommit`), as :meth:`from_settings` does: a committed transaction
    that freed a slot admits the next waiting request, one that queued events wakes the
    relay."""

    settings: Settings
    db: Database
    vendor: DeepBrainClient | None
    dispatcher: Dispatcher
    vendors: Vendors = field(init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _pool_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _timers: set[threading.Timer] = field(default_factory=set, init=False, repr=False)

    def stop_pool(self) -> ThreadPoolExecutor:
        """Threads for the reaper's parallel vendor stops; long-lived, so their HTTP clients
        and connections are reused from one sweep to the next."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(MAX_PARALLEL_STOPS, thread_name_prefix="stops")
            return self._pool

    def call_later(self, delay: float, action: Callable[[], object]) -> None:
        """Run ``action`` in its own thread after ``delay`` seconds, unless closed first."""

        def run() -> None:
            with self._pool_lock:
                self._timers.discard(timer)
            action()

        timer = threading.Timer(delay, run)
        timer.daemon = True
        with self._pool_lock:
            self._timers.add(timer)
        timer.start()

    def __post_init__(self) -> None:
        if not self.db.has_commit_hooks:  # commits would free slots that nobody hands out
            raise ValueError("the lifecycle's Database needs hooks=DispatchAfterCommit(dispatcher)")
        given = {DEFAULT_ACCOUNT: self.vendor} if self.vendor is not None else {}
        self.vendors = Vendors(self.settings, self.db, catalog_for(self.settings), given=given)
        self.vendors.refresh(force=True)  # a bad catalog fails here; its rows are synced

    @classmethod
    def from_settings(cls, settings: Settings, dispatcher: Dispatcher) -> Lifecycle:
        return cls(
            settings=settings,
            db=Database(
                settings.effective_database_url,
                pool_size=settings.db_pool_size,
                hooks=DispatchAfterCommit(dispatcher),
            ),
            vendor=None,
            dispatcher=dispatcher,
        )

    def close(self) -> None:
        with self._pool_lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self.vendors.close()
        if self.vendor is not None:
            self.vendor.close()
        self.db.dispose()
