"""Vendor accounts: their definitions (a mounted folder, the environment, and today's
single-account settings as ``default``), reloaded on change.

The lifecycle uses them through :mod:`orchestrator.lifecycle.vendors` (docs/admission.md).
"""

from orchestrator.accounts.catalog import (
    AccountCatalog,
    SingleAccount,
    catalog_for,
    check_accounts,
    load_accounts,
)
from orchestrator.accounts.model import DEFAULT_ACCOUNT, Account, parse_labels
from orchestrator.accounts.sources import ENV_ACCOUNT_PREFIX, LIST_FILE, AccountsError

__all__ = [
    "DEFAULT_ACCOUNT",
    "ENV_ACCOUNT_PREFIX",
    "LIST_FILE",
    "Account",
    "AccountCatalog",
    "AccountsError",
    "SingleAccount",
    "catalog_for",
    "check_accounts",
    "load_accounts",
    "parse_labels",
]
