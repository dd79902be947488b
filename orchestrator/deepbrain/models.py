"""Typed views of the vendor's replies (start, list row, detail) and the stop outcome."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from orchestrator.deepbrain.errors import DeepBrainError
from orchestrator.deepbrain.values import (
    MAX_SESSION_ID_LENGTH,
    FieldReader,
    clean_text,
    is_storable_id,
    loggable_id,
)

__all__ = [
    "StartedSession",
    "StopOutcome",
    "VendorSession",
    "parse_started_session",
    "parse_vendor_session",
]


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
    unparseable; ``duration`` is in seconds (the vendor does not document the unit); texts hold
    no NUL, and a blank ``end_reason`` is None. ``raw`` is the whole row as received, read-only.
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
    skipped: tuple[str, ...] = ()  # fields present but unusable (they read as None)


def _malformed(endpoint: str, what: str, *, session_id: str | None = None) -> DeepBrainError:
    # The vendor said yes but its reply is not what the API documents: not retryable.
    # ``unusable_session_id``: a session the vendor created that this reply cannot record.
    error = DeepBrainError(endpoint, f"unexpected reply shape: {what}")
    error.unusable_session_id = session_id
    return error


def parse_started_session(data: Any, endpoint: str) -> StartedSession:
    """Build a :class:`StartedSession` from the start reply's ``data``.

    Optional fields that cannot be used are skipped (logged with the session's id); a reply
    without what a session needs (its id, the LiveKit block) raises, naming the session it
    created if it has an id (``unusable_session_id``) so that the caller stops it."""
    if not isinstance(data, Mapping):
        raise _malformed(endpoint, "data is not an object")
    session_id = data.get("session_id")
    if not isinstance(session_id, str) or not session_id.strip():
        raise _malformed(endpoint, "data.session_id missing")
    shown = loggable_id(session_id)
    if not is_storable_id(session_id):
        raise _malformed(
            endpoint,
            f"data.session_id {shown} cannot be recorded (over {MAX_SESSION_ID_LENGTH} "
            "characters, or NUL / unpaired surrogates)",
            session_id=session_id,
        )
    livekit = data.get("livekit")
    if not isinstance(livekit, Mapping):
        raise _malformed(endpoint, f"data.livekit missing (session {shown})", session_id=session_id)
    url, room, token = (
        clean_text(value) if isinstance(value, str) else None
        for value in (livekit.get("url"), livekit.get("room_name"), livekit.get("token"))
    )
    # Empty (once cleaned for storage) is missing: a session nobody can join must not be
    # recorded as started.
    if not (url and room and token):
        raise _malformed(
            endpoint,
            f"data.livekit url/room_name/token missing (session {shown})",
            session_id=session_id,
        )
    fields = FieldReader(data, endpoint)
    started = StartedSession(
        session_id=session_id,
        voice_id=fields.text("voice_id"),
        max_session_duration=fields.integer("max_session_duration", low=1),
        max_session_numbers=fields.integer("max_session_numbers", low=0),
        livekit_url=url,
        livekit_room=room,
        livekit_token=token,
    )
    fields.log_skips(session_id)
    return started


def parse_vendor_session(row: Any, endpoint: str) -> VendorSession:
    """Build a :class:`VendorSession` from a list row or a detail ``data`` object. Only a
    missing id raises; any other unusable value reads as missing and is named in
    ``skipped`` (and logged with the row's id)."""
    if not isinstance(row, Mapping):
        raise _malformed(endpoint, "session is not an object")
    session_id = row.get("sessionId", row.get("session_id"))
    if not isinstance(session_id, str) or not session_id:
        raise _malformed(endpoint, "sessionId missing")
    fields = FieldReader(row, endpoint)
    session = VendorSession(
        session_id=session_id,
        created_at=fields.time("created_at"),
        updated_at=fields.time("updated_at"),
        end_at=fields.time("end_at"),
        duration=fields.number("duration"),
        source=fields.text("source"),
        credits_consumed=fields.number("credits_consumed"),
        end_reason=fields.text("end_reason"),
        raw=MappingProxyType(dict(row)),
        skipped=tuple(fields.skipped),
    )
    fields.log_skips(session_id)
    return session
