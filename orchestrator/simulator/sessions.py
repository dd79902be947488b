"""The vendor's session records, per account: creation against the account's cap, lazy
ends at the max-duration or idle deadline, and the rows list and detail answer.

Not thread-safe: :class:`~orchestrator.simulator.state.SimulatorState` holds its lock
around every call.
"""

from __future__ import annotations

import copy
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Outcome = Literal["ok", "unknown", "ended"]


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC timestamp with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")


@dataclass
class VendorSession:
    session_id: str
    account: str
    avatar_id: str
    seq: int
    created_at: float
    granted_minutes: int
    requested_minutes: int | None
    max_end_at: float
    voice_id: str | None
    livekit_url: str
    room_name: str
    identity: str
    livekit_token: str
    livekit_token_expires_at: float
    request_body: Any
    request_content_type: str | None
    last_activity_at: float
    ended_at: float | None = None
    end_reason: str | None = None
    ended_by: str | None = None
    stop_calls: int = 0
    stop_requests: list[dict[str, Any]] = field(default_factory=list)
    pings: int = 0
    talks: int = 0

    @property
    def active(self) -> bool:
        return self.ended_at is None

    def updated_at(self) -> float:
        return self.ended_at if self.ended_at is not None else self.last_activity_at

    def duration(self, now: float) -> float:
        end = self.ended_at if self.ended_at is not None else now
        return max(0.0, end - self.created_at)

    def list_row(self, now: float, credits_per_minute: float) -> dict[str, Any]:
        """The row of the vendor's list and detail replies."""
        duration = self.duration(now)
        return {
            "sessionId": self.session_id,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at()),
            "duration": int(duration),
            "source": "api",
            "credits_consumed": round(duration / 60.0 * credits_per_minute, 2),
        }


@dataclass(frozen=True)
class NewSession:
    """What a start asks for, already validated and with its LiveKit grant minted."""

    account: str
    avatar_id: str
    granted_minutes: int
    requested_minutes: int | None
    granted_seconds: float
    voice_id: str | None
    livekit_url: str
    livekit_token: str
    livekit_token_expires_at: float
    request_body: Any
    request_content_type: str | None
    session_id: str

    @property
    def room_name(self) -> str:
        return room_name_of(self.session_id)

    @property
    def identity(self) -> str:
        return identity_of(self.session_id)


def new_session_id() -> str:
    return uuid.uuid4().hex


def room_name_of(session_id: str) -> str:
    return f"room-{session_id}"


def identity_of(session_id: str) -> str:
    return f"client-{session_id[:12]}"


class SessionBook:
    """Every session ever created, and the live ones of each account."""

    def __init__(self) -> None:
        self.sessions: dict[str, VendorSession] = {}
        self.active: dict[str, dict[str, VendorSession]] = {}
        self.max_active = 0
        self.max_active_by_account: dict[str, int] = {}
        self._next_check = math.inf
        self._seq = 0

    def clear(self) -> None:
        """Forget every session (the sequence goes on, so order stays total)."""
        self.sessions.clear()
        self.active.clear()
        self.max_active = 0
        self.max_active_by_account.clear()
        self._next_check = math.inf

    def recheck(self) -> None:
        """Deadlines may have moved earlier (e.g. a smaller idle timeout)."""
        self._next_check = 0.0

    def live_count(self, account: str | None = None) -> int:
        if account is not None:
            return len(self.active.get(account, {}))
        return sum(len(live) for live in self.active.values())

    def expire(self, now: float, idle: float | None) -> None:
        """End every live session whose max-duration or idle deadline has passed,
        *at that deadline*."""
        if now < self._next_check:
            return
        next_check = math.inf
        for live in self.active.values():
            for sid, session in list(live.items()):
                end_at, reason = session.max_end_at, "MAX_DURATION_REACHED"
                if idle is not None and session.last_activity_at + idle < end_at:
                    end_at, reason = session.last_activity_at + idle, "IDLE_TIMEOUT"
                if end_at <= now:
                    session.ended_at = max(end_at, session.created_at)
                    session.end_reason = reason
                    session.ended_by = (
                        "max_duration" if reason == "MAX_DURATION_REACHED" else "idle"
                    )
                    del live[sid]
                else:
                    next_check = min(next_check, end_at)
        self._next_check = next_check

    def create(
        self, new: NewSession, now: float, cap: int, idle: float | None
    ) -> VendorSession | None:
        """Record a started session, or None when its account is at ``cap``."""
        self.expire(now, idle)
        live = self.active.setdefault(new.account, {})
        if len(live) >= cap:
            return None
        self._seq += 1
        session = VendorSession(
            session_id=new.session_id,
            account=new.account,
            avatar_id=new.avatar_id,
            seq=self._seq,
            created_at=now,
            granted_minutes=new.granted_minutes,
            requested_minutes=new.requested_minutes,
            max_end_at=now + new.granted_seconds,
            voice_id=new.voice_id,
            livekit_url=new.livekit_url,
            room_name=new.room_name,
            identity=new.identity,
            livekit_token=new.livekit_token,
            livekit_token_expires_at=new.livekit_token_expires_at,
            request_body=copy.deepcopy(new.request_body),
            request_content_type=new.request_content_type,
            last_activity_at=now,
        )
        self.sessions[session.session_id] = session
        live[session.session_id] = session
        self.max_active = max(self.max_active, self.live_count())
        self.max_active_by_account[new.account] = max(
            self.max_active_by_account.get(new.account, 0), len(live)
        )
        deadline = session.max_end_at
        if idle is not None:
            deadline = min(deadline, session.last_activity_at + idle)
        self._next_check = min(self._next_check, deadline)
        return session

    def find(self, session_id: str, account: str | None) -> VendorSession | None:
        """The session, if it belongs to ``account`` (None: any account)."""
        session = self.sessions.get(session_id)
        if session is None or (account is not None and session.account != account):
            return None
        return session

    def live(self, session_id: str, account: str | None) -> VendorSession | Outcome:
        """The session if it still runs, else why not (``expire`` first)."""
        session = self.find(session_id, account)
        if session is None:
            return "unknown"
        if not session.active:
            return "ended"
        return session

    def end(self, session: VendorSession, now: float, reason: str, ended_by: str) -> None:
        session.ended_at = now
        session.end_reason = reason
        session.ended_by = ended_by
        del self.active[session.account][session.session_id]

    def chosen(self, kind: str | None, account: str | None) -> list[VendorSession]:
        """Sessions of ``account`` (None: all), oldest first; ``kind`` active, historic or
        None (all)."""
        if kind == "active":
            if account is not None:
                return list(self.active.get(account, {}).values())
            live = [s for by_account in self.active.values() for s in by_account.values()]
            return sorted(live, key=lambda s: s.seq)
        chosen = [s for s in self.sessions.values() if account is None or s.account == account]
        if kind == "historic":
            return [s for s in chosen if not s.active]
        return chosen


#: Top-level start fields the vendor documents (its start-session page).
DOCUMENTED_START_FIELDS = frozenset(
    {"avatar_id", "avatar_persona", "max_session_duration", "lip_audio_mode", "greeting_text"}
)


def admin_view(session: VendorSession, now: float) -> dict[str, Any]:
    """Everything the simulator knows of a session (``GET /_sim/sessions``)."""
    body = session.request_body
    unexpected = (
        sorted(k for k in body if k not in DOCUMENTED_START_FIELDS)
        if isinstance(body, dict)
        else []
    )
    return {
        "session_id": session.session_id,
        "account": session.account,
        "avatar_id": session.avatar_id,
        "status": "active" if session.active else "ended",
        "created_at": iso(session.created_at),
        "updated_at": iso(session.updated_at()),
        "last_activity_at": iso(session.last_activity_at),
        "expires_at": iso(session.max_end_at),
        "ended_at": iso(session.ended_at),
        "end_reason": session.end_reason,
        "ended_by": session.ended_by,
        "duration_seconds": round(session.duration(now), 3),
        "requested_minutes": session.requested_minutes,
        "granted_minutes": session.granted_minutes,
        "voice_id": session.voice_id,
        "livekit_url": session.livekit_url,
        "livekit_room": session.room_name,
        "livekit_identity": session.identity,
        "livekit_token": session.livekit_token,
        "livekit_token_expires_at": iso(session.livekit_token_expires_at),
        "request_body": copy.deepcopy(body),
        "request_content_type": session.request_content_type,
        "unexpected_fields": unexpected,
        "stop_calls": session.stop_calls,
        "stop_requests": copy.deepcopy(session.stop_requests),
        "pings": session.pings,
        "talks": session.talks,
    }
