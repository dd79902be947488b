"""One vendor client per account, and each account's health counted per vendor call.

Each account has its own :class:`DeepBrainClient` (its own token cache and connections), made
from the catalog (:mod:`orchestrator.accounts`). The catalog is checked at most once a
second (a few ``stat`` calls); when an account's keys change its client is replaced, so a
rotated key is used without a restart, and the catalog's part of each account (cap, weight,
labels) is synced to its ``vendor_accounts`` row.

Health (docs/admission.md "Health"): a network error, timeout or 5xx is a failed call; the
third in a row opens the account's circuit (no new starts there) for a cooldown; a
successful call closes it. A 401 on the token or the list disables the account until an
operator enables it (a critical log line and an ``account.disabled`` event).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from orchestrator import retries, store
from orchestrator.accounts import DEFAULT_ACCOUNT, Account, AccountCatalog, AccountsError
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.deepbrain import (
    DeepBrainClient,
    DeepBrainError,
    VendorAuthError,
    VendorServerError,
    VendorUnavailable,
)
from orchestrator.lifecycle import metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")
REFRESH_EVERY_SECONDS = 1.0
# The rows are synced again this often even when nothing changed here: during a rollout that
# changes the accounts, a pod with the old definitions may have synced last.
RESYNC_EVERY_SECONDS = 60.0
FAILURES_TO_OPEN = 3
COOLDOWN_SECONDS = 30.0
MAX_COOLDOWN_SECONDS = 300.0
# The calls whose 401 means the account's key is refused (a 401 elsewhere may be a token
# that expired in flight; the client already refreshes it once).
KEY_ENDPOINTS = ("/api/v2/sessions/token", "GET /api/v2/sessions")


class AccountUnavailable(DeepBrainError):
    """No key for the account (not in the catalog, or the catalog never loaded): the call is
    not made. A stop keeps its row ``stopping`` and is tried again."""


def _best_effort(action: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """A health write: the vendor call's own outcome matters more than its bookkeeping, so a
    database that is away costs the record (logged), never the call's error."""
    try:
        return action(*args, **kwargs)
    except SQLAlchemyError as error:
        logger.warning("account health not recorded: %s", type(error).__name__)
        return None


def _refused_key(error: VendorAuthError) -> bool:
    return any(error.endpoint.endswith(e) or error.endpoint == e for e in KEY_ENDPOINTS)


@dataclass
class Vendors:
    """The accounts' clients; ``client(name)`` is what every vendor call goes through."""

    settings: Settings
    db: Database
    catalog: AccountCatalog
    given: dict[str, DeepBrainClient] = field(default_factory=dict)  # not made, not closed
    _clients: dict[str, tuple[Account, DeepBrainClient]] = field(default_factory=dict)
    _retired: list[DeepBrainClient] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _checked: float = float("-inf")
    _failing: set[str] = field(default_factory=set)
    _synced: bool = False
    _synced_at: float = float("-inf")

    def refresh(self, *, force: bool = False) -> None:
        """Reload the catalog if it changed (at most once a second unless ``force``), and
        sync the accounts' rows until a sync succeeds (the database may be away)."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < REFRESH_EVERY_SECONDS and self._clients:
                return
            self._checked = now
            try:
                changed = self.catalog.refresh()
            except AccountsError as error:
                if not self._clients:
                    raise
                logger.error(
                    "account definitions not reloaded (the last good ones stay): %s", error
                )
                return
            if changed or not self._clients:
                self._replace_clients(self.catalog.accounts())
                self._synced = False
            if self._synced and now - self._synced_at < RESYNC_EVERY_SECONDS:
                return
            entries = [
                store.CatalogEntry(a.name, a.cap, a.weight, dict(a.labels))
                for a, _ in self._clients.values()
            ]
        if _best_effort(store.sync_catalog, self.db, entries):
            with self._lock:
                self._synced, self._synced_at = True, now

    def _replace_clients(self, accounts: Mapping[str, Account]) -> None:
        for name in list(self._clients):
            held, client = self._clients[name]
            if name not in accounts or not held.same_secrets(accounts[name]):
                self._retired.append(client)  # closed at the end: calls may be in flight
                del self._clients[name]
        for name, account in accounts.items():
            kept = self._clients.get(name)
            self._clients[name] = (account, kept[1] if kept else self._new_client(account))

    def _new_client(self, account: Account) -> DeepBrainClient:
        if account.name in self.given:
            return self.given[account.name]
        return DeepBrainClient(
            self.settings.deepbrain_base_url,
            account.app_id,
            account.user_key,
            timeout_seconds=self.settings.vendor_timeout_seconds,
            retry=retries.vendor_call(self.settings),
        )

    def accounts(self) -> Mapping[str, Account]:
        self.refresh()
        with self._lock:
            return {name: held for name, (held, _) in self._clients.items()}

    def client(self, name: str | None) -> DeepBrainClient:
        """The client of account ``name`` (``default`` for rows from before accounts)."""
        self.refresh()
        key = name or DEFAULT_ACCOUNT
        with self._lock:
            found = self._clients.get(key)
        if found is None:
            raise AccountUnavailable("account", f"no key for account {key!r} in the catalog")
        return found[1]

    @contextmanager
    def call(self, name: str | None, endpoint: str) -> Iterator[DeepBrainClient]:
        """One vendor call on an account: its metrics (labelled by account) and its health."""
        key = name or DEFAULT_ACCOUNT
        client = self.client(key)
        try:
            with metrics.vendor_call(endpoint, account=key):
                yield client
        except VendorAuthError as error:
            if _refused_key(error):
                self._disable(key, error)
            raise
        except (VendorUnavailable, VendorServerError) as error:
            self._failed(key, error)
            raise
        else:
            self._succeeded(key)

    def _failed(self, name: str, error: DeepBrainError) -> None:
        with self._lock:
            self._failing.add(name)
        opened = _best_effort(
            store.record_failure,
            self.db,
            name,
            str(error),
            threshold=FAILURES_TO_OPEN,
            cooldown_seconds=COOLDOWN_SECONDS,
            max_cooldown_seconds=MAX_COOLDOWN_SECONDS,
        )
        if opened:
            logger.error("account %s: circuit open after %d failed calls", name, FAILURES_TO_OPEN)
            metrics.record_account_event(name, "circuit_opened")

    def _succeeded(self, name: str) -> None:
        with self._lock:
            if name not in self._failing:
                return  # nothing this process saw to clear: no write on the usual call
            self._failing.discard(name)
        _best_effort(store.record_success, self.db, name)

    def note_success(self, name: str) -> None:
        """A cheap call (the reconciler's list) succeeded: close the circuit wherever it was
        opened (one conditional UPDATE; no write when there is nothing to clear)."""
        with self._lock:
            self._failing.discard(name)
        store.record_success(self.db, name)

    def _disable(self, name: str, error: DeepBrainError) -> None:
        if _best_effort(store.disable_refused, self.db, name, str(error)):
            logger.critical(
                "account %s disabled: the vendor refused its key (%s); enable it with"
                " `orchestrator accounts enable %s` once the key is fixed",
                name,
                error.error_code,
                name,
            )
            _best_effort(store.log_account_disabled, self.db, name, "the vendor refused its key")
            metrics.record_account_event(name, "disabled")

    def close(self) -> None:
        with self._lock:
            given = [id(c) for c in self.given.values()]
            for client in [c for _, c in self._clients.values()] + self._retired:
                if id(client) not in given:
                    client.close()
            self._clients.clear()
            self._retired.clear()
