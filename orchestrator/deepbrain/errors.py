"""Exception hierarchy for DeepBrain failures, and the one place that maps a failure to it.

Every failure of a vendor call is a :class:`DeepBrainError`. Two functions build them:
:func:`error_from_reply` (an HTTP reply that is not a success) and :func:`error_from_transport`
(no usable reply: connect failure, timeout, dropped connection). Nothing else picks a class.

No exception ever holds a request, a response, a header or a body: ``str()``, ``repr()`` and
pickling show the endpoint, the HTTP status, the vendor's code and its (sanitised) message only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx

from orchestrator.deepbrain.values import clean_text
from orchestrator.errors import OrchestratorError
from orchestrator.masking import mask

__all__ = [
    "DeepBrainError",
    "VendorAuthError",
    "VendorConflict",
    "VendorForbidden",
    "VendorNotFound",
    "VendorOutOfCredits",
    "VendorRateLimited",
    "VendorServerError",
    "VendorUnavailable",
    "VendorValidationError",
    "error_from_reply",
    "error_from_transport",
    "parse_retry_after",
    "sanitize_message",
]

_MAX_MESSAGE_CHARS = 300
# A JWT (session token, LiveKit token): three base64url parts, the first one a JSON header.
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def sanitize_message(
    message: object, secrets: Iterable[str] = (), *, request_secrets: Iterable[str] = ()
) -> str:
    """One line, at most 300 chars, with known secrets (ours, whatever their length; the
    request's, by :func:`orchestrator.masking.mask`'s rules) and anything JWT-shaped replaced,
    and nothing Postgres cannot store (NUL, unpaired surrogates)."""
    request_secrets = tuple(request_secrets)
    text = mask(str(message), request_secrets)
    text = mask(clean_text(" ".join(text.split())), request_secrets)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _JWT_RE.sub("***", text)
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text


class DeepBrainError(OrchestratorError):
    """Base of every DeepBrain failure.

    Attributes: ``endpoint`` ("POST /api/v2/sessions/start"), ``http_status`` and ``code``
    (the envelope's code; None when there was no reply or no envelope), ``vendor_message``,
    ``retryable``, ``retry_after_seconds`` (from ``Retry-After``, when sent), ``attempts``
    (requests sent for the logical call that failed), ``uncertain_attempts`` (start only:
    how many of them may have created a vendor session) and ``unusable_session_id`` (start
    only: a session the vendor created whose reply we cannot record; the client stops it).
    """

    shown_as = "DeepBrain API (ORCHESTRATOR_DEEPBRAIN_BASE_URL)"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        endpoint: str,
        vendor_message: str,
        *,
        code: int | None = None,
        http_status: int | None = None,
        retryable: bool | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.vendor_message = vendor_message
        self.code = code
        self.http_status = http_status
        self.retryable = self.default_retryable if retryable is None else retryable
        self.retry_after_seconds = retry_after_seconds
        self.attempts = 1
        self.uncertain_attempts = 0
        self.unusable_session_id: str | None = None
        super().__init__(self._summary())

    @property
    def error_code(self) -> str:
        """Our error code for a failed row.

        ``VENDOR_<code>`` when the vendor sent a code (e.g. ``VENDOR_4020``), else
        ``VENDOR_HTTP_<status>`` (a reply without envelope), else ``VENDOR_BAD_REPLY`` (a success
        reply whose data is not what the API documents).
        """
        if self.code is not None:
            return f"VENDOR_{self.code}"
        if self.http_status is not None:
            return f"VENDOR_HTTP_{self.http_status}"
        return "VENDOR_BAD_REPLY"

    def _summary(self) -> str:
        parts = []
        if self.http_status is not None:
            parts.append(f"HTTP {self.http_status}")
        if self.code is not None:
            parts.append(f"code {self.code}")
        parts.append(self.error_code)
        return f"DeepBrain {self.endpoint} failed ({', '.join(parts)}): {self.vendor_message}"

    def __str__(self) -> str:
        return self._summary()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._summary()!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments: rebuild from the attributes (Celery pickles results).
        return (_restore, (type(self), dict(self.__dict__)))


def _restore(cls: type[DeepBrainError], state: dict[str, Any]) -> DeepBrainError:
    exc = cls.__new__(cls)
    exc.__dict__.update(state)
    exc.args = (exc._summary(),)
    return exc


class VendorValidationError(DeepBrainError):
    """4000 / HTTP 400, 422: the request was invalid. Never retried."""


class VendorAuthError(DeepBrainError):
    """4010 / HTTP 401: token or userKey rejected."""


class VendorOutOfCredits(DeepBrainError):
    """4020 / HTTP 402."""


class VendorForbidden(DeepBrainError):
    """4030 / HTTP 403: forbidden or plan limit."""


class VendorNotFound(DeepBrainError):
    """4040 / HTTP 404: unknown session (or one of another appId)."""


class VendorConflict(DeepBrainError):
    """4090 / HTTP 409: e.g. the session has already ended."""


class VendorRateLimited(DeepBrainError):
    """4290 / HTTP 429. ``retry_after_seconds`` holds the vendor's ``Retry-After``, if any."""

    default_retryable = True


class VendorServerError(DeepBrainError):
    """5000 / HTTP 5xx, or a reply that is not the vendor's JSON envelope. Retried."""

    default_retryable = True


class VendorUnavailable(DeepBrainError):
    """No usable reply: connect failure, timeout, dropped connection. Retried.

    ``uncertain`` is True when the request may have reached the vendor (read/write timeout,
    connection dropped after sending), False when it surely did not (connect error, connect
    timeout, no free connection in the pool). ``error_code`` is ``VENDOR_TIMEOUT`` (read, write
    or pool timeout, HTTP 408), ``VENDOR_UNREACHABLE`` (connect error or connect timeout) or
    ``VENDOR_NETWORK_ERROR`` (connection reset or protocol error after connecting).
    """

    default_retryable = True

    def __init__(
        self,
        endpoint: str,
        vendor_message: str,
        *,
        uncertain: bool,
        kind_code: str,
        http_status: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.uncertain = uncertain
        self._kind_code = kind_code
        super().__init__(endpoint, vendor_message, http_status=http_status, retryable=retryable)

    @property
    def error_code(self) -> str:
        return self._kind_code


_BY_CODE: dict[int, type[DeepBrainError]] = {
    4000: VendorValidationError,
    4010: VendorAuthError,
    4020: VendorOutOfCredits,
    4030: VendorForbidden,
    4040: VendorNotFound,
    4090: VendorConflict,
    4290: VendorRateLimited,
    5000: VendorServerError,
}
_BY_STATUS: dict[int, type[DeepBrainError]] = {
    400: VendorValidationError,
    401: VendorAuthError,
    402: VendorOutOfCredits,
    403: VendorForbidden,
    404: VendorNotFound,
    409: VendorConflict,
    422: VendorValidationError,
    429: VendorRateLimited,
}


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return None if seconds < 0 or not math.isfinite(seconds) else seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" dates: UTC by RFC 5322
        when = when.replace(tzinfo=UTC)
    current = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def error_from_reply(
    endpoint: str,
    http_status: int,
    code: int | None,
    vendor_message: str,
    *,
    retry_after: str | None = None,
    has_envelope: bool = True,
) -> DeepBrainError:
    """Map a failed reply to its class: by envelope code first, by HTTP status when unknown.

    A reply without the vendor's JSON envelope that is 2xx or 5xx (garbage from the vendor or
    a proxy in front of it) is a :class:`VendorServerError`; a 4xx one falls back on its status.
    """
    retry_after_seconds = parse_retry_after(retry_after)
    cls = _BY_CODE.get(code) if code is not None else None
    if cls is None:
        if not has_envelope and (200 <= http_status < 300 or http_status >= 500):
            cls = VendorServerError
        elif http_status == 408:
            return VendorUnavailable(
                endpoint,
                vendor_message,
                uncertain=True,
                kind_code="VENDOR_TIMEOUT",
                http_status=408,
            )
        elif http_status >= 500:
            cls = VendorServerError
        else:
            cls = _BY_STATUS.get(http_status, DeepBrainError)
    return cls(
        endpoint,
        vendor_message,
        code=code,
        http_status=http_status,
        retry_after_seconds=retry_after_seconds,
    )


def error_from_transport(
    endpoint: str,
    exc: httpx.TransportError,
    *,
    timeout_seconds: float,
    secrets: Iterable[str] = (),
    request_secrets: Iterable[str] = (),
) -> VendorUnavailable:
    """Map an httpx transport failure (no usable reply) to :class:`VendorUnavailable`."""
    name = type(exc).__name__
    detail = sanitize_message(exc, secrets, request_secrets=request_secrets)
    message = f"{name}: {detail}" if detail else name
    retryable = True
    if isinstance(exc, httpx.ConnectTimeout):
        uncertain, kind = False, "VENDOR_UNREACHABLE"
        message = f"{name}: could not connect within {timeout_seconds:g}s"
    elif isinstance(exc, httpx.PoolTimeout):
        uncertain, kind = False, "VENDOR_TIMEOUT"
        message = f"{name}: no free connection within {timeout_seconds:g}s"
    elif isinstance(exc, httpx.TimeoutException):  # read or write timeout: the vendor may have it
        uncertain, kind = True, "VENDOR_TIMEOUT"
        message = f"{name}: no reply within {timeout_seconds:g}s"
    elif isinstance(exc, httpx.ConnectError | httpx.ProxyError):
        uncertain, kind = False, "VENDOR_UNREACHABLE"
    elif isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        # Our side is wrong (bad base URL, malformed request): nothing was sent, retry cannot help.
        uncertain, kind, retryable = False, "VENDOR_UNREACHABLE", False
    else:  # ReadError, WriteError, RemoteProtocolError, CloseError: the request may have gone out
        uncertain, kind = True, "VENDOR_NETWORK_ERROR"
    return VendorUnavailable(
        endpoint, message, uncertain=uncertain, kind_code=kind, retryable=retryable
    )
