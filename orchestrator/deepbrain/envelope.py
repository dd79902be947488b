"""The vendor's replies, read as untrusted input: the envelope (``{"code", "message",
"data"}``: a success gives its ``data``; anything else — no JSON, no envelope, an odd code, an
error code — becomes the DeepBrainError it means), a page of the session list, and whether a
failed start may have made a session; and a request's JSON body."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from orchestrator.deepbrain.errors import (
    DeepBrainError,
    VendorServerError,
    VendorUnavailable,
    error_from_reply,
    sanitize_message,
)
from orchestrator.deepbrain.models import VendorSession, parse_vendor_session
from orchestrator.deepbrain.values import skipped_values

SUCCESS_CODE = 1000


def json_bytes(value: Any) -> bytes:
    """``value`` as JSON in ASCII. A session id the vendor sent with an unpaired surrogate
    (JSON's ``\\ud800`` escape) goes back as that same escape, so the session can be stopped;
    httpx's own encoding is UTF-8, which cannot hold one and raises UnicodeEncodeError."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii")


def _is_short_ascii_number(text: str) -> bool:
    # str.isdigit() also accepts "²" (which int() refuses); a code is a few digits.
    return 0 < len(text) <= 9 and text.isascii() and text.isdigit()


def unwrap(
    endpoint: str, response: httpx.Response, secrets: tuple[str, ...], masked: frozenset[str]
) -> Any:
    """The envelope's ``data`` of a success (an HTTP 2xx with code 1000), else the
    DeepBrainError the reply means, its texts without our ``secrets`` nor the request's
    ``masked`` values."""
    status = response.status_code
    try:
        payload = response.json()
    except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
        payload = None
    if not isinstance(payload, Mapping) or "code" not in payload:
        kind = "a non-JSON body" if payload is None else "JSON without the vendor envelope"
        content_type = response.headers.get("content-type", "none")
        summary = f"reply has {kind} (content-type {content_type}, {len(response.content)} bytes)"
        raise error_from_reply(
            endpoint,
            status,
            None,
            sanitize_message(summary, secrets),
            retry_after=response.headers.get("retry-after"),
            has_envelope=False,
        )
    raw_code = payload.get("code")
    code = (
        raw_code
        if isinstance(raw_code, int) and not isinstance(raw_code, bool) and 0 <= raw_code < 10**9
        else None
    )
    if code is None and isinstance(raw_code, str) and _is_short_ascii_number(raw_code):
        code = int(raw_code)
    if 200 <= status < 300 and code == SUCCESS_CODE:
        return payload.get("data")
    vendor_message = payload.get("message")
    raise error_from_reply(
        endpoint,
        status,
        code,
        sanitize_message(
            vendor_message if vendor_message is not None else "",
            secrets,
            request_secrets=masked,
        )
        or "(no message)",
        retry_after=response.headers.get("retry-after"),
        has_envelope=True,
    )


def may_have_started(exc: DeepBrainError) -> bool:
    """True when a failed start may still have created a vendor session.

    That is a 5xx or garbage reply, a timeout or connection lost after sending, or a success
    status whose reply we could not use (an unknown code, data not as documented).
    """
    if isinstance(exc, VendorUnavailable):
        return exc.uncertain
    if isinstance(exc, VendorServerError):
        return True
    unclassified = type(exc) is DeepBrainError
    return unclassified and (exc.http_status is None or 200 <= exc.http_status < 300)


def read_list_page(
    data: Any, endpoint: str, page: int, on_malformed: Callable[[str], None] | None
) -> tuple[list[VendorSession], bool]:
    """The sessions of one page of ``GET /api/v2/sessions`` and whether another page follows.
    A row that is not a session raises, unless ``on_malformed`` is given: it is then told why,
    and the row is skipped."""
    results = data.get("results") if isinstance(data, Mapping) else None
    if not isinstance(results, list):
        raise DeepBrainError(endpoint, f"unexpected reply shape: page {page} has no results")
    sessions = []
    for row in results:
        try:
            sessions.append(parse_vendor_session(row, endpoint))
        except DeepBrainError as error:
            if on_malformed is None:
                raise
            skipped_values.add(1, {"field": "session", "endpoint": endpoint})
            on_malformed(error.vendor_message)
    return sessions, bool(data.get("next")) and bool(results)
