"""The vendor accounts the simulator serves: each its own keys, cap, sessions and faults.

Without ``SimulatorConfig.accounts`` the simulator serves one account, ``default``, made
of the top-level ``app_id``, ``user_key`` and ``max_concurrent_sessions``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from orchestrator.simulator.endpoint_values import check_rates_and_delays, parse_endpoint_values

DEFAULT_ACCOUNT: Final = "default"
ACCOUNT_NAME: Final = re.compile(r"[a-z0-9-]{1,63}")
_PER_ENDPOINT: Final = frozenset({"endpoint_latency", "failure_rate"})


@dataclass(frozen=True)
class SimulatorAccount:
    """One vendor account. Latency and failure rates left unset take the simulator-wide
    values; ``server_errors`` and ``refuse_key`` add to the simulator-wide switches."""

    name: str
    app_id: str
    user_key: str
    #: Live sessions allowed at once (reported as ``max_session_numbers``).
    max_concurrent_sessions: int = 10
    #: Delay of every request of this account; None: the simulator-wide ``latency_seconds``.
    latency_seconds: float | None = None
    endpoint_latency: Mapping[str, float] = field(default_factory=dict)
    failure_rate: Mapping[str, float] = field(default_factory=dict)
    #: Every call of this account answers 500 / 5000 (an outage of this account alone).
    server_errors: bool = False
    #: The vendor refuses this account's key: 401 / 4010 on every call, valid key or not.
    refuse_key: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not ACCOUNT_NAME.fullmatch(self.name):
            raise ValueError(f"account name must match [a-z0-9-]{{1,63}}, got {self.name!r}")
        where = f"account {self.name}: "
        for name in ("app_id", "user_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{where}{name} must be a non-empty string")
        cap = self.max_concurrent_sessions
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(f"{where}max_concurrent_sessions must be an integer >= 0")
        latency = self.latency_seconds
        if latency is not None and (
            isinstance(latency, bool)
            or not isinstance(latency, int | float)
            or not math.isfinite(latency)
            or latency < 0
        ):
            raise ValueError(f"{where}latency_seconds must be a finite number >= 0")
        for name in _PER_ENDPOINT:
            value = getattr(self, name)
            if not isinstance(value, Mapping | str | list | tuple):
                raise ValueError(f"{where}{name} must be a mapping of endpoint to number")
            object.__setattr__(self, name, parse_endpoint_values(value))
        check_rates_and_delays(where, self.failure_rate, self.endpoint_latency)
        for name in ("server_errors", "refuse_key"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}{name} must be true or false")

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimulatorAccount:
        unknown = sorted(set(data) - cls.field_names())
        if unknown:
            raise ValueError(f"unknown account field(s): {', '.join(unknown)}")
        missing = sorted({"name", "app_id", "user_key"} - set(data))
        if missing:
            raise ValueError(f"account needs {', '.join(missing)}")
        return cls(**dict(data))

    def with_changes(self, **changes: Any) -> SimulatorAccount:
        """A copy with ``changes`` applied (validated; the name cannot change)."""
        unknown = sorted(set(changes) - (self.field_names() - {"name"}))
        if unknown:
            raise ValueError(f"unknown account setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in _PER_ENDPOINT:
            out[name] = dict(out[name])
        return out


def coerce_accounts(value: Any) -> tuple[SimulatorAccount, ...]:
    """Accounts from a list of ``SimulatorAccount`` or mappings; checks names and keys are
    unique (the token endpoint tells accounts apart by appId, the others by userKey)."""
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise ValueError("accounts must be a list of accounts")
    accounts = tuple(
        item if isinstance(item, SimulatorAccount) else _account_from(item) for item in value
    )
    for attribute in ("name", "app_id", "user_key"):
        seen: set[str] = set()
        for account in accounts:
            key = getattr(account, attribute)
            if key in seen:
                shown = f" {key!r}" if attribute == "name" else ""
                raise ValueError(
                    f"two accounts share the {attribute}{shown} (account {account.name})"
                )
            seen.add(key)
    return accounts


def _account_from(item: Any) -> SimulatorAccount:
    if not isinstance(item, Mapping):
        raise ValueError("each account must be an object")
    return SimulatorAccount.from_dict(item)


def load_accounts_file(path: str | Path) -> tuple[SimulatorAccount, ...]:
    """Accounts from a JSON file: a list of account objects, or ``{"accounts": [...]}``.
    Errors are one line naming the file."""
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: cannot read ({exc.__class__.__name__})") from None
    except ValueError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and set(data) == {"accounts"}:
        data = data["accounts"]
    try:
        accounts = coerce_accounts(data)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if not accounts:
        raise ValueError(f"{source}: names no account")
    return accounts
