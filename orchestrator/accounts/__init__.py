"""Vendor accounts: their definitions (a mounted folder, the environment, and today's
single-account settings as ``default``), reloaded on change.

Groundwork for a pool of accounts (docs/admission.md): nothing in the lifecycle uses it yet.
"""

from orchestrator.accounts.catalog import AccountCatalog, SingleAccount, load_accounts
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
    "load_accounts",
    "parse_labels",
]
