"""Knobs of the DeepBrain simulator and its scripted faults.

Written from the vendor API description (``deepbrain-api.md``) only, never
from the orchestrator's own DeepBrain client.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

#: Endpoint names used by per-endpoint knobs, scripted faults and stats.
ENDPOINTS: Final[tuple[str, ...]] = ("token", "start", "stop", "ping", "talk", "list", "detail")

#: Default message per envelope code, used when a fault or error gives none.
DEFAULT_MESSAGES: Final[Mapping[int, str]] = {
    4000: "validation error",
    4010: "session token missing, invalid or expired",
    4020: "out of credits",
    4030: "forbidden",
    4040: "session not found",
    4090: "conflict",
    4290: "too many requests",
    5000: "SESSION_ROOM_NOT_FOUND",
}


def default_code_for_status(status: int) -> int:
    """The envelope code the vendor pairs with an HTTP status (deepbrain-api.md table)."""
    known = {400: 4000, 422: 4000, 401: 4010, 402: 4020, 403: 4030, 404: 4040, 409: 4090}
    if status in known:
        return known[status]
    if status == 429:
        return 4290
    if status >= 500:
        return 5000
    return 4000


def _spec_items(spec: str | Mapping[str, Any] | Iterable[str]) -> list[tuple[str, Any]]:
    if isinstance(spec, Mapping):
        return list(spec.items())
    parts = [spec] if isinstance(spec, str) else list(spec)
    items: list[tuple[str, Any]] = []
    for part in parts:
        for raw in str(part).split(","):
            entry = raw.strip()
            if not entry:
                continue
            name, sep, value = entry.partition("=")
            items.append((name.strip(), value.strip()) if sep else ("*", entry))
    return items


def parse_endpoint_values(
    spec: str | Mapping[str, Any] | Iterable[str] | None,
) -> dict[str, float]:
    """Parse per-endpoint numbers, e.g. ``"start=0.1,stop=0.05"``.

    Accepts a mapping, a comma separated string, or an iterable of such strings
    (a repeated CLI option). ``*=0.1`` or a bare ``0.1`` applies to every
    endpoint; later entries override earlier ones. Raises ``ValueError`` naming
    the bad part.
    """
    result: dict[str, float] = {}
    for name, value in _spec_items(spec) if spec is not None else []:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number):
            raise ValueError(f"{name}={value!r}: not a number")
        if name == "*":
            result.update(dict.fromkeys(ENDPOINTS, number))
        elif name in ENDPOINTS:
            result[name] = number
        else:
            raise ValueError(f"unknown endpoint {name!r} (expected one of {', '.join(ENDPOINTS)})")
    return result


def _new_secret() -> str:
    return secrets.token_urlsafe(32)


_MAPPING_FIELDS: Final = frozenset({"failure_rate", "endpoint_latency"})
_OPTIONAL_FIELDS: Final = frozenset({"idle_timeout_seconds", "seed", "voice_id"})
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

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _MAPPING_FIELDS:
                if not isinstance(value, Mapping):
                    raise ValueError(f"{f.name} must be a mapping of endpoint to number")
                object.__setattr__(self, f.name, parse_endpoint_values(value))
            elif value is not None or f.name not in _OPTIONAL_FIELDS:
                _check_type(f.name, value)
        self._check_ranges()

    def _check_ranges(self) -> None:
        for name, rate in self.failure_rate.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"failure_rate for {name} must be between 0 and 1, got {rate}")
        for name, delay in self.endpoint_latency.items():
            if delay < 0:
                raise ValueError(f"endpoint_latency for {name} must be >= 0, got {delay}")
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
        ``"start=0.1,stop=0.05"`` form and *replace* the previous mapping.
        """
        unknown = sorted(set(changes) - self.field_names())
        if unknown:
            raise ValueError(f"unknown simulator setting(s): {', '.join(unknown)}")
        coerced = {name: _coerce(name, value) for name, value in changes.items()}
        return dataclasses.replace(self, **coerced)

    @classmethod
    def from_options(cls, **options: Any) -> SimulatorConfig:
        """Build from CLI-style options: ``None`` values are skipped (defaults apply),
        per-endpoint knobs may be strings like ``"start=0.1,stop=0.05"`` or a tuple of
        them (a repeated click option), numbers may be strings.

        Aliases for CLI option names: ``latency`` -> ``latency_seconds``,
        ``failure_rates`` -> ``failure_rate``, ``idle_timeout`` -> ``idle_timeout_seconds``,
        ``token_ttl`` -> ``token_ttl_seconds``, ``max_concurrent`` -> ``max_concurrent_sessions``.
        An ``idle_timeout`` of 0 or ``"none"`` disables the idle timeout.
        """
        aliases = {
            "latency": "latency_seconds",
            "failure_rates": "failure_rate",
            "idle_timeout": "idle_timeout_seconds",
            "token_ttl": "token_ttl_seconds",
            "max_concurrent": "max_concurrent_sessions",
        }
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
            out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out

    # -- derived values -------------------------------------------------------

    def latency_for(self, endpoint: str) -> float:
        return self.endpoint_latency.get(endpoint, self.latency_seconds)

    def failure_rate_for(self, endpoint: str) -> float:
        return self.failure_rate.get(endpoint, 0.0)


def _check_type(name: str, value: Any) -> None:
    if name in _INT_FIELDS:
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


_FAULT_KEYS: Final = frozenset(
    {
        "endpoint",
        "status",
        "code",
        "message",
        "retry_after",
        "delay_seconds",
        "count",
        "after_create",
        "disconnect",
        "raw_body",
    }
)


@dataclass(frozen=True)
class Fault:
    """A scripted reply for the next ``count`` requests to ``endpoint``.

    - ``status``/``code``/``message``: answer this error instead (code defaults
      from the status, e.g. 429 -> 4290; message from the code).
    - ``retry_after``: value of a ``Retry-After`` header (seconds or an HTTP date).
    - ``delay_seconds``: wait this long first (a hang, to test client timeouts);
      alone, the request is then handled normally.
    - ``after_create``: handle the request normally (start creates the session,
      stop ends it, ...) and *then* answer the error (default 500 / 5000):
      the caller never learns what happened.
    - ``disconnect``: close the connection without any reply (combine with
      ``after_create`` for "created, then the connection dropped").
    - ``raw_body``: reply with this text (``text/plain``) instead of the JSON
      envelope, like a proxy's error page.
    """

    endpoint: str
    status: int | None = None
    code: int | None = None
    message: str | None = None
    retry_after: str | None = None
    delay_seconds: float = 0.0
    count: int = 1
    after_create: bool = False
    disconnect: bool = False
    raw_body: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(
                f"fault endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}"
            )
        if self.status is not None and (
            isinstance(self.status, bool)
            or not isinstance(self.status, int)
            or not 100 <= self.status <= 599
        ):
            raise ValueError(f"fault status must be an HTTP status, got {self.status!r}")
        if self.code is not None and (
            isinstance(self.code, bool) or not isinstance(self.code, int)
        ):
            raise ValueError(f"fault code must be an integer, got {self.code!r}")
        if self.message is not None and not isinstance(self.message, str):
            raise ValueError("fault message must be a string")
        if self.raw_body is not None and not isinstance(self.raw_body, str):
            raise ValueError("fault raw_body must be a string")
        if (
            isinstance(self.delay_seconds, bool)
            or not isinstance(self.delay_seconds, int | float)
            or not math.isfinite(self.delay_seconds)
            or self.delay_seconds < 0
        ):
            raise ValueError("fault delay_seconds must be a number >= 0")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError("fault count must be an integer >= 1")
        if not isinstance(self.after_create, bool) or not isinstance(self.disconnect, bool):
            raise ValueError("fault after_create and disconnect must be booleans")
        if (
            self.status is None
            and self.code is None
            and self.delay_seconds == 0
            and not self.after_create
            and not self.disconnect
            and self.raw_body is None
        ):
            raise ValueError("fault does nothing: give a status, delay_seconds or disconnect")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        unknown = sorted(set(data) - _FAULT_KEYS)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
        if "endpoint" not in data:
            raise ValueError("fault needs an endpoint")
        values = dict(data)
        if "retry_after" in values and values["retry_after"] is not None:
            values["retry_after"] = str(values["retry_after"])
        try:
            return cls(**values)
        except TypeError as exc:  # pragma: no cover - guarded by the key check
            raise ValueError(str(exc)) from None

    @property
    def replaces_reply(self) -> bool:
        """True when the reply is not the normal one (an error, a raw body or no reply)."""
        return (
            self.status is not None
            or self.code is not None
            or self.after_create
            or self.disconnect
            or self.raw_body is not None
        )

    def reply_status(self) -> int:
        if self.status is not None:
            return self.status
        if self.code is not None:
            return max(100, min(599, self.code // 10))
        return 500

    def reply_code(self) -> int:
        if self.code is not None:
            return self.code
        return default_code_for_status(self.reply_status())

    def reply_message(self) -> str:
        if self.message is not None:
            return self.message
        return DEFAULT_MESSAGES.get(self.reply_code(), "simulated failure")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
