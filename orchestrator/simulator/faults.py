"""Scripted faults: the reply the simulator gives instead of (or after) the normal one."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from orchestrator.simulator.endpoint_values import ENDPOINTS

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
    """The envelope code the vendor pairs with an HTTP status (its documented table of errors)."""
    known = {400: 4000, 422: 4000, 401: 4010, 402: 4020, 403: 4030, 404: 4040, 409: 4090}
    if status in known:
        return known[status]
    if status == 429:
        return 4290
    if status >= 500:
        return 5000
    return 4000


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
        "account",
        "trickle_bytes",
        "trickle_interval_seconds",
        "reset_after_bytes",
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
    - ``account``: only requests of this account (by its appId, token or key) take
      the fault; None: the next request to ``endpoint`` whatever its account.
    - ``trickle_bytes``/``trickle_interval_seconds``: send the reply's body (the normal one
      or the fault's) this many bytes at a time, waiting this long between two pieces: each
      read is quick, the whole reply slow (a total deadline is what cuts it short).
    - ``reset_after_bytes``: reset the connection (TCP RST) once this many bytes of the
      reply's body are sent; the request was handled (a start made its session).
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
    account: str | None = None
    trickle_bytes: int = 0
    trickle_interval_seconds: float = 0.0
    reset_after_bytes: int | None = None

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
        if self.account is not None and (not isinstance(self.account, str) or not self.account):
            raise ValueError("fault account must be an account name")
        if (
            isinstance(self.delay_seconds, bool)
            or not isinstance(self.delay_seconds, int | float)
            or not math.isfinite(self.delay_seconds)
            or self.delay_seconds < 0
        ):
            raise ValueError("fault delay_seconds must be a number >= 0")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError("fault count must be an integer >= 1")
        self._check_body_shape()
        if not isinstance(self.after_create, bool) or not isinstance(self.disconnect, bool):
            raise ValueError("fault after_create and disconnect must be booleans")
        if (
            self.status is None
            and self.code is None
            and self.delay_seconds == 0
            and not self.after_create
            and not self.disconnect
            and self.raw_body is None
            and not self.shapes_body
        ):
            raise ValueError("fault does nothing: give a status, delay_seconds or disconnect")

    def _check_body_shape(self) -> None:
        def count(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        if not count(self.trickle_bytes):
            raise ValueError("fault trickle_bytes must be an integer >= 0")
        interval = self.trickle_interval_seconds
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not math.isfinite(interval)
            or interval < 0
        ):
            raise ValueError("fault trickle_interval_seconds must be a number >= 0")
        if self.reset_after_bytes is not None and not count(self.reset_after_bytes):
            raise ValueError("fault reset_after_bytes must be an integer >= 0")

    @property
    def shapes_body(self) -> bool:
        """True when the reply's body is trickled or cut by a reset."""
        return self.trickle_bytes > 0 or self.reset_after_bytes is not None

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
