"""Typed views of the vendor's replies (start, list row, detail) and the stop outcome."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from orchestrator.deepbrain.errors import DeepBrainError

__all__ = [
    "StartedSession",
    "StopOutcome",
    "VendorSession",
    "parse_started_session",
    "parse_vendor_session",
]

logger = logging.getLogger("orchestrator.deepbrain")


class StopOutcome(StrEnum):
    """Result of a stop that did not fail."""

    STOPPED = "stopped"
    ALREADY_ENDED = "already_ended"  # 409 / 4090
    NOT_FOUND = "not_found"  # 404 / 4040: no such session for this account


@dataclass(frozen=True)
class StartedSession:
    """A session the vendor started. ``livekit_token`` never shows in ``repr``.

    ``max_session_duration`` is the granted length in minutes. ``attempts`` counts the start
    requests sent for this call (a 401 refresh and every retry included) and
    ``uncertain_attempts`` those that failed in a way that may have created an extra vendor
    session (5xx, read timeout, dropped connection) — the reconciler stops such orphans.
    """

    session_id: str
    voice_id: str | None
    max_session_duration: int | None
    max_session_numbers: int | None
    livekit_url: str
    livekit_room: str
    livekit_token: str = field(repr=False)
    attempts: int = 1
    uncertain_attempts: int = 0


@dataclass(frozen=True)
class VendorSession:
    """A row of the list endpoint or the detail of one session.

    Timestamps are tz-aware (a naive vendor timestamp is taken as UTC) and None when missing or
    unparseable; ``duration`` is in seconds (the vendor does not document the unit). ``raw`` is
    the whole row as received, read-only.
    """

    session_id: str
    created_at: datetime | None
    updated_at: datetime | None
    end_at: datetime | None
    duration: float | None
    source: str | None
    credits_consumed: float | None
    end_reason: str | None
    raw: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False, hash=False
    )


def _malformed(endpoint: str, what: str) -> DeepBrainError:
    # The vendor said yes but its reply is not what the API documents: not retryable.
    return DeepBrainError(endpoint, f"unexpected reply shape: {what}")


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _opt_number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _opt_int(value: Any) -> int | None:
    number = _opt_number(value)
    if number is None or not number.is_integer():
        return None
    return int(number)


def _opt_datetime(value: Any, name: str) -> datetime | None:
    if value is None or value == "":
        return None
    parsed: datetime | None = None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        parsed = datetime.fromtimestamp(value, UTC)
    if parsed is None:
        logger.warning("deepbrain: ignoring unparseable timestamp in field %s", name)
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def parse_started_session(data: Any, endpoint: str) -> StartedSession:
    """Build a :class:`StartedSession` from the start reply's ``data``."""
    if not isinstance(data, Mapping):
        raise _malformed(endpoint, "data is not an object")
    session_id = data.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        raise _malformed(endpoint, "data.session_id missing")
    livekit = data.get("livekit")
    if not isinstance(livekit, Mapping):
        raise _malformed(endpoint, f"data.livekit missing (session {session_id})")
    url, room, token = livekit.get("url"), livekit.get("room_name"), livekit.get("token")
    # Empty is missing: a session nobody can join must not be recorded as started.
    if not (
        isinstance(url, str)
        and isinstance(room, str)
        and isinstance(token, str)
        and url
        and room
        and token
    ):
        raise _malformed(
            endpoint, f"data.livekit url/room_name/token missing (session {session_id})"
        )
    return StartedSession(
        session_id=session_id,
        voice_id=_opt_str(data.get("voice_id")),
        max_session_duration=_opt_int(data.get("max_session_duration")),
        max_session_numbers=_opt_int(data.get("max_session_numbers")),
        livekit_url=url,
        livekit_room=room,
        livekit_token=token,
    )


def parse_vendor_session(row: Any, endpoint: str) -> VendorSession:
    """Build a :class:`VendorSession` from a list row or a detail ``data`` object."""
    if not isinstance(row, Mapping):
        raise _malformed(endpoint, "session is not an object")
    session_id = row.get("sessionId", row.get("session_id"))
    if not isinstance(session_id, str) or not session_id:
        raise _malformed(endpoint, "sessionId missing")
    return VendorSession(
        session_id=session_id,
        created_at=_opt_datetime(row.get("created_at"), "created_at"),
        updated_at=_opt_datetime(row.get("updated_at"), "updated_at"),
        end_at=_opt_datetime(row.get("end_at"), "end_at"),
        duration=_opt_number(row.get("duration")),
        source=_opt_str(row.get("source")),
        credits_consumed=_opt_number(row.get("credits_consumed")),
        end_reason=_opt_str(row.get("end_reason")),
        raw=MappingProxyType(dict(row)),
    )
