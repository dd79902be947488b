"""The set of accounts, from a mounted folder, the environment and today's single-account
settings, reloaded when the folder changes (a rotated key in a mounted Secret is picked up
without a restart).

Today's settings (``ORCHESTRATOR_DEEPBRAIN_APP_ID``/``USER_KEY``,
``ORCHESTRATOR_MAX_CONCURRENT_SESSIONS`` as its cap) are the account ``default`` whenever
they are set; with no account defined anywhere else they are the only one, as before
accounts existed. Defining ``default`` elsewhere as well is an error (which one wins would
be a guess). Metadata-only variables (cap, weight, labels; no keys) complete an account
defined elsewhere, e.g. keys in a mounted Secret and the rest from the chart's ConfigMap.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import SecretStr

from orchestrator.accounts.model import DEFAULT_ACCOUNT, Account
from orchestrator.accounts.sources import (
    ENV_ACCOUNT_PREFIX,
    AccountsError,
    Defined,
    Overlay,
    read_environment,
    read_folder,
    read_overlays,
)
from orchestrator.config import (
    DEFAULT_DEEPBRAIN_BASE_URL,
    ENV_PREFIX,
    PLACEHOLDER_SECRETS,
    Settings,
)

APP_ID_VARIABLE: Final = f"{ENV_PREFIX}DEEPBRAIN_APP_ID"
USER_KEY_VARIABLE: Final = f"{ENV_PREFIX}DEEPBRAIN_USER_KEY"


@dataclass(frozen=True)
class SingleAccount:
    """Today's single-account settings, as the caller read them (``Settings``)."""

    app_id: SecretStr | None
    user_key: SecretStr | None
    max_concurrent_sessions: int


def _given(value: SecretStr | None) -> bool:
    return value is not None and bool(value.get_secret_value().strip())


def _default_account(single: SingleAccount) -> Defined | None:
    has_id, has_key = _given(single.app_id), _given(single.user_key)
    if not has_id and not has_key:
        return None
    if not has_id or not has_key:
        missing = APP_ID_VARIABLE if not has_id else USER_KEY_VARIABLE
        raise AccountsError(f"{missing} is required with {APP_ID_VARIABLE}/{USER_KEY_VARIABLE}")
    account = Account(
        name=DEFAULT_ACCOUNT,
        app_id=single.app_id,
        user_key=single.user_key,
        cap=single.max_concurrent_sessions,
    )
    return Defined(account, f"{APP_ID_VARIABLE}/{USER_KEY_VARIABLE}")


def _check_placeholders(defined: Defined) -> None:
    for field in ("app_id", "user_key"):
        secret: SecretStr = getattr(defined.account, field)
        if secret.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
            raise AccountsError(
                f"{defined.source}: {field} of account {defined.account.name} is a placeholder,"
                " not a real DeepBrain credential"
            )


def load_accounts(
    folder: Path | None,
    environ: Mapping[str, str],
    single: SingleAccount,
    base_url: str = DEFAULT_DEEPBRAIN_BASE_URL,
) -> dict[str, Account]:
    """Every account, by name (sorted); :class:`AccountsError` on any bad definition."""
    found: list[Defined] = []
    if folder is not None:
        found.extend(read_folder(folder))
    found.extend(read_environment(environ))
    default = _default_account(single)
    if default is not None:
        found.append(default)
    by_name: dict[str, Defined] = {}
    for defined in found:
        name = defined.account.name
        if name in by_name:
            raise AccountsError(
                f"{defined.source}: account {name} is also defined by {by_name[name].source}"
            )
        by_name[name] = defined
    for overlay in read_overlays(environ):
        _apply(overlay, by_name)
    if not by_name:
        where = f"{folder} or " if folder is not None else ""
        raise AccountsError(
            f"no DeepBrain account: set {APP_ID_VARIABLE} and {USER_KEY_VARIABLE}, or define"
            f" accounts in {where}{ENV_ACCOUNT_PREFIX}<NAME>_APP_ID/_USER_KEY"
        )
    if base_url.rstrip("/") == DEFAULT_DEEPBRAIN_BASE_URL:
        for defined in by_name.values():
            _check_placeholders(defined)
    return {name: by_name[name].account for name in sorted(by_name)}


def _apply(overlay: Overlay, by_name: dict[str, Defined]) -> None:
    """Add an overlay's cap, weight and labels to the account defined elsewhere; a field
    set in both places is an error (which one wins would be a guess)."""
    base = by_name.get(overlay.name)
    if base is None:
        raise AccountsError(
            f"{overlay.source}: account {overlay.name} has no keys: define it in"
            f" {ENV_ACCOUNT_PREFIX}..._APP_ID/_USER_KEY or the accounts folder as well"
        )
    account = base.account
    twice = sorted(set(overlay.values) & account.model_fields_set)
    if twice:
        raise AccountsError(
            f"{overlay.source}: {', '.join(twice)} of account {overlay.name} is also set by"
            f" {base.source}"
        )
    fields = {f: getattr(account, f) for f in account.model_fields_set}
    merged = Account.model_validate({**fields, **overlay.values})
    by_name[overlay.name] = Defined(merged, f"{base.source} + {overlay.source}")


def _folder_signature(folder: Path) -> tuple[object, ...]:
    """What changes when a mounted Secret is updated: the folder's entries and, through
    its symlinks, the files' identity, size and times. A few stat calls, no reads."""
    try:
        top = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        return ("unreadable", error.errno)
    parts: list[object] = [top.st_mtime_ns, top.st_ino]
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError as error:
            parts.append((entry.name, "unreadable", error.errno))
            continue
        parts.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(parts)


def _environment_digest(environ: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(n for n in environ if n.startswith(ENV_ACCOUNT_PREFIX)):
        digest.update(f"{name}\0{environ[name]}\0".encode())
    return digest.hexdigest()


class AccountCatalog:
    """The accounts, kept current by :meth:`refresh` (callers run it before use).

    A definition that turns bad keeps the last good accounts in use: :meth:`refresh`
    raises its error once, and :attr:`last_error` keeps it until a good one replaces it.
    """

    def __init__(
        self,
        single: SingleAccount,
        *,
        folder: Path | None = None,
        environ: Mapping[str, str] | None = None,
        base_url: str = DEFAULT_DEEPBRAIN_BASE_URL,
    ) -> None:
        self._single = single
        self._folder = folder
        self._environ = environ if environ is not None else os.environ
        self._base_url = base_url
        self._accounts: dict[str, Account] | None = None
        self._signature: tuple[object, ...] | None = None
        self.last_error: AccountsError | None = None

    def _current_signature(self) -> tuple[object, ...]:
        folder = _folder_signature(self._folder) if self._folder is not None else ()
        return (folder, _environment_digest(self._environ))

    def refresh(self) -> bool:
        """Reload if the folder or the account variables changed; True when reloaded.
        Raises :class:`AccountsError` for a bad new definition (the previous accounts stay)
        or, before any good load, for a bad one."""
        signature = self._current_signature()
        if signature == self._signature and self._accounts is not None:
            return False
        if signature == self._signature and self.last_error is not None:
            raise self.last_error
        self._signature = signature
        try:
            accounts = load_accounts(self._folder, self._environ, self._single, self._base_url)
        except AccountsError as error:
            self.last_error = error
            raise
        self.last_error = None
        changed = accounts != self._accounts
        self._accounts = accounts
        return changed

    def accounts(self) -> Mapping[str, Account]:
        """Every account by name, as last loaded (loading now if never)."""
        if self._accounts is None:
            self.refresh()
        assert self._accounts is not None
        return dict(self._accounts)

    def get(self, name: str) -> Account:
        accounts = self.accounts()
        if name not in accounts:
            raise AccountsError(f"no account named {name!r} (known: {', '.join(accounts)})")
        return accounts[name]


def catalog_for(settings: Settings, environ: Mapping[str, str] | None = None) -> AccountCatalog:
    """The catalog a worker uses: ``ORCHESTRATOR_ACCOUNTS_DIR``, the account variables, and
    today's settings as ``default``."""
    single = SingleAccount(
        settings.deepbrain_app_id, settings.deepbrain_user_key, settings.max_concurrent_sessions
    )
    return AccountCatalog(
        single, folder=settings.accounts_dir, environ=environ, base_url=settings.deepbrain_base_url
    )


def check_accounts(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Refuse to start without a usable account (one line naming what is wrong). With only
    today's settings, their own message names the missing variable, as before accounts."""
    env = environ if environ is not None else os.environ
    if settings.accounts_dir is None and not any(n.startswith(ENV_ACCOUNT_PREFIX) for n in env):
        settings.vendor_credentials()
    catalog_for(settings, env).refresh()
