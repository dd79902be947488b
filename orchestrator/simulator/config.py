"""Knobs of the DeepBrain simulator.

Written from the vendor's API documentation only (tests/hostile/schema.py), never
from the orchestrator's own DeepBrain client.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from orchestrator.simulator.accounts import (
    DEFAULT_ACCOUNT,
    SimulatorAccount,
    coerce_accounts,
    load_accounts_file,
)
from orchestrator.simulator.endpoint_values import (
    ENDPOINTS,
    check_rates_and_delays,
    parse_endpoint_values,
)
from orchestrator.simulator.faults import DEFAULT_MESSAGES, Fault, default_code_for_status

__all__ = [
    "DEFAULT_MESSAGES",
    "ENDPOINTS",
    "Fault",
    "SimulatorConfig",
    "default_code_for_status",
    "parse_endpoint_values",
]


def _new_secret() -> str:
    return secrets.token_urlsafe(32)


_MAPPING_FIELDS: Final = frozenset({"failure_rate", "endpoint_latency"})
_OPTIONAL_FIELDS: Final = frozenset({"idle_timeout_seconds", "seed", "voice_id"})
_BOOL_FIELDS: Final = frozenset({"server_errors", "refuse_key"})
#: Fields only the implicit ``default`` account uses (accounts have their own).
_IMPLICIT_ACCOUNT_ONLY: Final = frozenset({"app_id", "user_key", "max_concurrent_sessions"})
#: Top-level fields that describe the implicit ``default`` account (no ``accounts`` given).
_DEFAULT_ACCOUNT_FIELDS: Final = frozenset(
    {
        "app_id",
        "user_key",
        "max_concurrent_sessions",
        "latency_seconds",
        "endpoint_latency",
        "failure_rate",
        "server_errors",
        "refuse_key",
    }
)
_INT_FIELDS: Final = frozenset(
    {
        "max_concurrent_sessions",
        "limit_status",
        "limit_code",
        "plan_max_minutes",
        "default_duration_minutes",
        "start_http_status",
        "list_default_page_size",
        "seed",
    }
)
_FLOAT_FIELDS: Final = frozenset(
    {
        "latency_seconds",
        "idle_timeout_seconds",
        "token_ttl_seconds",
        "seconds_per_minute",
        "livekit_token_margin_seconds",
        "credits_per_minute",
    }
)


@dataclass(frozen=True)
class SimulatorConfig:
    """Simulator knobs. Immutable: change them with :meth:`with_changes`
    (``SimulatorServer.configure`` / ``POST /_sim/config`` do that at runtime)."""

    #: Account credentials the token endpoint accepts; ``user_key`` is also the
    #: ``STUDIO-API-KEY`` of stop, list and detail.
    app_id: str = "demo-app-id"
    user_key: str = "demo-user-key"
    #: Delay added to every API request (seconds); ``endpoint_latency`` overrides it per endpoint.
    latency_seconds: float = 0.0
    endpoint_latency: Mapping[str, float] = field(default_factory=dict)
    #: Probability per endpoint of answering 500 / 5000 "SESSION_ROOM_NOT_FOUND".
    failure_rate: Mapping[str, float] = field(default_factory=dict)
    #: Live sessions allowed at once (reported as ``max_session_numbers``).
    max_concurrent_sessions: int = 10
    #: The reply to a start past the limit (the vendor does not document it).
    limit_status: int = 403
    limit_code: int = 4030
    limit_message: str = "concurrent session limit reached"
    #: A session with no ping/talk for this long ends with ``IDLE_TIMEOUT``; None disables.
    idle_timeout_seconds: float | None = 180.0
    #: Lifetime of a session token (``exp`` claim).
    token_ttl_seconds: float = 3600.0
    #: Upper bound of ``max_session_duration`` (minutes); more is a 400 / 4000.
    plan_max_minutes: int = 60
    #: Granted minutes when a start omits ``max_session_duration``.
    default_duration_minutes: int = 20
    #: Length of one vendor "minute" in real seconds: lower it to test max-duration ends fast.
    seconds_per_minute: float = 60.0
    livekit_url: str = "wss://livekit.simulator.invalid"
    livekit_api_key: str = "simulator-livekit-key"
    livekit_api_secret: str = "simulator-livekit-secret-do-not-use-in-production"  # noqa: S105
    #: The LiveKit token expires this long after the session's granted end.
    livekit_token_margin_seconds: float = 300.0
    #: ``voice_id`` in the start reply; None omits the field (later vendor revisions).
    voice_id: str | None = "sim-voice-en-US-1"
    #: HTTP status of a successful start (200; later vendor revisions answer 201).
    start_http_status: int = 200
    #: ``page_size`` of the list endpoint when the query omits it.
    list_default_page_size: int = 10
    #: Credits charged per minute of session (``credits_consumed``).
    credits_per_minute: float = 1.0
    #: Seed of the RNG behind ``failure_rate`` (None: not reproducible).
    seed: int | None = None
    #: HS256 secret of the session tokens (random per process unless given).
    token_secret: str = field(default_factory=_new_secret, repr=False)
    #: Every call answers 500 / 5000 (the whole vendor down), whatever the account.
    server_errors: bool = False
    #: Every account's key is refused: 401 / 4010 on every call.
    refuse_key: bool = False
    #: The accounts served; empty: one account, ``default``, of the fields above.
    #: (A list is accepted and kept as a tuple.)
    accounts: Sequence[SimulatorAccount] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "accounts":
                object.__setattr__(self, f.name, coerce_accounts(value))
            elif f.name in _MAPPING_FIELDS:
                if not isinstance(value, Mapping):
                    raise ValueError(f"{f.name} must be a mapping of endpoint to number")
                object.__setattr__(self, f.name, parse_endpoint_values(value))
            elif value is not None or f.name not in _OPTIONAL_FIELDS:
                _check_type(f.name, value)
        self._check_ranges()

    def _check_ranges(self) -> None:
        check_rates_and_delays("", self.failure_rate, self.endpoint_latency)
        checks = [
            (self.max_concurrent_sessions >= 0, "max_concurrent_sessions must be >= 0"),
            (self.plan_max_minutes >= 1, "plan_max_minutes must be >= 1"),
            (self.default_duration_minutes >= 1, "default_duration_minutes must be >= 1"),
            (self.seconds_per_minute > 0, "seconds_per_minute must be > 0"),
            (100 <= self.limit_status <= 599, "limit_status must be an HTTP status"),
            (self.start_http_status in (200, 201), "start_http_status must be 200 or 201"),
            (
                1 <= self.list_default_page_size <= 100,
                "list_default_page_size must be between 1 and 100",
            ),
            (bool(self.app_id and self.user_key), "app_id and user_key must be non-empty"),
            (
                bool(self.token_secret and self.livekit_api_key and self.livekit_api_secret),
                "token_secret and the LiveKit key/secret must be non-empty",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    # -- building and changing ------------------------------------------------

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    def with_changes(self, **changes: Any) -> SimulatorConfig:
        """A copy with ``changes`` applied (validated; unknown names raise ``ValueError``).

        Per-endpoint knobs (``failure_rate``, ``endpoint_latency``) also accept the
        ``"start=0.1,stop=0.05"`` form and *replace* the previous mapping; ``accounts``
        (a list of accounts or mappings) replaces every account. With accounts, the keys and
        the cap are each account's: changing the top-level ones is refused, not ignored.
        """
        unknown = sorted(set(changes) - self.field_names())
        if unknown:
            raise ValueError(f"unknown simulator setting(s): {', '.join(unknown)}")
        coerced = {name: _coerce(name, value) for name, value in changes.items()}
        per_account = sorted(set(changes) & _IMPLICIT_ACCOUNT_ONLY)
        if per_account and coerced.get("accounts", self.accounts):
            raise ValueError(
                f"{', '.join(per_account)}: set per account when accounts are given"
                " (configure_account NAME or the account's own fields)"
            )
        return dataclasses.replace(self, **coerced)

    @classmethod
    def from_options(cls, **options: Any) -> SimulatorConfig:
        """Build from CLI-style options: ``None`` values are skipped (defaults apply),
        per-endpoint knobs may be strings like ``"start=0.1,stop=0.05"`` or a tuple of
        them (a repeated click option), numbers may be strings.

        Aliases for CLI option names: ``latency`` -> ``latency_seconds``,
        ``failure_rates`` -> ``failure_rate``, ``idle_timeout`` -> ``idle_timeout_seconds``,
        ``token_ttl`` -> ``token_ttl_seconds``, ``max_concurrent`` -> ``max_concurrent_sessions``.
        An ``idle_timeout`` of 0 or ``"none"`` disables the idle timeout; ``accounts_file``
        (a JSON file, see :func:`load_accounts_file`) sets ``accounts``.
        """
        aliases = {
            "latency": "latency_seconds",
            "failure_rates": "failure_rate",
            "idle_timeout": "idle_timeout_seconds",
            "token_ttl": "token_ttl_seconds",
            "max_concurrent": "max_concurrent_sessions",
        }
        accounts_file = options.pop("accounts_file", None)
        if accounts_file is not None:
            options["accounts"] = load_accounts_file(Path(accounts_file))
        changes: dict[str, Any] = {}
        for name, value in options.items():
            if value is None or (isinstance(value, tuple | list) and not value):
                continue
            key = aliases.get(name, name)
            if key == "idle_timeout_seconds" and (
                value == 0 or (isinstance(value, str) and value.lower() in ("none", "off", "0"))
            ):
                changes[key] = None
                continue
            changes[key] = value
        return cls().with_changes(**changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (without ``token_secret``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "token_secret":
                continue
            value = getattr(self, f.name)
            if f.name == "accounts":
                out[f.name] = [account.to_dict() for account in value]
            else:
                out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out

    # -- derived values -------------------------------------------------------

    @cached_property
    def _served(self) -> tuple[SimulatorAccount, ...]:
        # Built once per configuration: every request asks for its account.
        if self.accounts:
            return tuple(self.accounts)
        return (
            SimulatorAccount(
                name=DEFAULT_ACCOUNT,
                app_id=self.app_id,
                user_key=self.user_key,
                max_concurrent_sessions=self.max_concurrent_sessions,
            ),
        )

    def account_list(self) -> tuple[SimulatorAccount, ...]:
        """The accounts served: ``accounts``, or the one ``default`` account."""
        return self._served

    def account(self, name: str) -> SimulatorAccount | None:
        return next((a for a in self.account_list() if a.name == name), None)

    def with_account_changes(self, name: str, **changes: Any) -> SimulatorConfig:
        """A copy with one account's settings changed (the ``default`` account of a
        single-account configuration is the top-level fields)."""
        if not self.accounts and name == DEFAULT_ACCOUNT:
            unknown = sorted(set(changes) - _DEFAULT_ACCOUNT_FIELDS)
            if unknown:
                raise ValueError(f"unknown account setting(s): {', '.join(unknown)}")
            return self.with_changes(**changes)
        if self.account(name) is None:
            raise ValueError(f"no account named {name!r}")
        coerced = {key: _coerce(key, value) for key, value in changes.items()}
        accounts = [a.with_changes(**coerced) if a.name == name else a for a in self.accounts]
        return dataclasses.replace(self, accounts=tuple(accounts))

    def latency_for(self, endpoint: str, account: str | None = None) -> float:
        chosen = self.account(account) if account is not None else None
        if chosen is not None and self.accounts:
            if endpoint in chosen.endpoint_latency:
                return chosen.endpoint_latency[endpoint]
            if chosen.latency_seconds is not None:
                return chosen.latency_seconds
        return self.endpoint_latency.get(endpoint, self.latency_seconds)

    def failure_rate_for(self, endpoint: str, account: str | None = None) -> float:
        chosen = self.account(account) if account is not None else None
        if chosen is not None and self.accounts and endpoint in chosen.failure_rate:
            return chosen.failure_rate[endpoint]
        return self.failure_rate.get(endpoint, 0.0)

    def server_errors_for(self, account: str | None) -> bool:
        chosen = self.account(account) if account is not None else None
        return self.server_errors or (chosen is not None and chosen.server_errors)

    def refuses_key_of(self, account: str | None) -> bool:
        chosen = self.account(account) if account is not None else None
        return self.refuse_key or (chosen is not None and chosen.refuse_key)


def _check_type(name: str, value: Any) -> None:
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    elif not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")


def _coerce(name: str, value: Any) -> Any:
    """Turn CLI/JSON values (strings, ints) into the field's type; validation is in the class."""
    if name in _MAPPING_FIELDS and isinstance(value, Mapping | str | tuple | list):
        return parse_endpoint_values(value)
    if name == "accounts":
        return coerce_accounts(value)
    if name in _BOOL_FIELDS and isinstance(value, str):
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        return words.get(value.lower(), value)
    kind: type[int] | type[float] | None = None
    if name in _INT_FIELDS:
        kind = int
    elif name in _FLOAT_FIELDS:
        kind = float
    if kind is None or value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) or (kind is float and isinstance(value, int)):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    return value
