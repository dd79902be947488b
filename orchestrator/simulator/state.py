"""In-memory vendor state of the simulator: sessions, tokens, faults and stats.

Every public method takes one lock, so the state can be read and changed from
any thread (the aiohttp loop, a test, a benchmark) while requests run.
Sessions end on their own lazily: before any read or change, sessions past
their max duration or idle deadline are ended *at that deadline*.
"""

from __future__ import annotations

import copy
import math
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jwt
from livekit import api as livekit_api

from orchestrator.simulator.config import ENDPOINTS, Fault, SimulatorConfig

#: Top-level start fields the vendor documents (deepbrain-api.md section 2).
DOCUMENTED_START_FIELDS = frozenset(
    {"avatar_id", "avatar_persona", "max_session_duration", "lip_audio_mode", "greeting_text"}
)

TOKEN_ISSUER = "deepbrain-simulator"  # noqa: S105 - an issuer name, not a secret

Outcome = Literal["ok", "unknown", "ended"]


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC timestamp with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")


@dataclass
class _Session:
    session_id: str
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


@dataclass
class _EndpointStats:
    calls: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    faults_applied: int = 0
    random_failures: int = 0


class SimulatorState:
    """The simulated vendor account. Thread-safe."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self._lock = threading.RLock()
        self._initial_config = config or SimulatorConfig()
        self._config = self._initial_config
        self._rng = random.Random(self._config.seed)
        self._sessions: dict[str, _Session] = {}
        self._active: dict[str, _Session] = {}
        self._faults: dict[str, deque[list[Any]]] = {name: deque() for name in ENDPOINTS}
        self._token_generation = 0
        self._next_check = math.inf
        self._seq = 0
        self._endpoint_stats = {name: _EndpointStats() for name in ENDPOINTS}
        self._stop_calls_unknown: dict[str, int] = {}
        self._max_active = 0

    # -- configuration --------------------------------------------------------

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Apply knob changes (validated); a new ``seed`` reseeds the fault RNG."""
        with self._lock:
            self._config = self._config.with_changes(**changes)
            if "seed" in changes:
                self._rng = random.Random(self._config.seed)
            # Deadlines may have moved earlier (e.g. a smaller idle timeout).
            self._next_check = 0.0
            return self._config

    def reset(self, *, restore_config: bool = False) -> None:
        """Forget sessions, faults and stats; reseed the RNG (revoked tokens stay revoked)."""
        with self._lock:
            if restore_config:
                self._config = self._initial_config
            self._rng = random.Random(self._config.seed)
            self._sessions.clear()
            self._active.clear()
            for queue in self._faults.values():
                queue.clear()
            self._next_check = math.inf
            self._endpoint_stats = {name: _EndpointStats() for name in ENDPOINTS}
            self._stop_calls_unknown.clear()
            self._max_active = 0

    def revoke_tokens(self) -> int:
        """Invalidate every session token minted so far; returns the new generation."""
        with self._lock:
            self._token_generation += 1
            return self._token_generation

    # -- faults -------------------------------------------------------------

    def push_fault(self, fault: Fault | Mapping[str, Any]) -> Fault:
        parsed = fault if isinstance(fault, Fault) else Fault.from_dict(fault)
        with self._lock:
            self._faults[parsed.endpoint].append([parsed, parsed.count])
        return parsed

    def pending_faults(self) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for queue in self._faults.values():
                for fault, remaining in queue:
                    entry = fault.to_dict()
                    entry["remaining"] = remaining
                    out.append(entry)
            return out

    def take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            queue = self._faults[endpoint]
            if not queue:
                return None
            head = queue[0]
            fault: Fault = head[0]
            head[1] -= 1
            if head[1] <= 0:
                queue.popleft()
            self._endpoint_stats[endpoint].faults_applied += 1
            return fault

    def roll_failure(self, endpoint: str) -> bool:
        with self._lock:
            rate = self._config.failure_rate_for(endpoint)
            if rate <= 0:
                return False
            failed = self._rng.random() < rate
            if failed:
                self._endpoint_stats[endpoint].random_failures += 1
            return failed

    # -- request accounting -----------------------------------------------------

    def begin_request(self, endpoint: str) -> None:
        with self._lock:
            stats = self._endpoint_stats[endpoint]
            stats.calls += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)

    def end_request(self, endpoint: str, status: int | str) -> None:
        """``status``: the HTTP status, or "dropped" / "cancelled" when none was sent."""
        with self._lock:
            stats = self._endpoint_stats[endpoint]
            stats.in_flight -= 1
            key = str(status)
            stats.statuses[key] = stats.statuses.get(key, 0) + 1

    def record_stop_call(self, session_id: str, reason: Any, status: int | str) -> None:
        """Count a stop call naming ``session_id``, whatever its outcome (401/404/409/5xx too)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                unknown = self._stop_calls_unknown
                unknown[session_id] = unknown.get(session_id, 0) + 1
                return
            session.stop_calls += 1
            session.stop_requests.append(
                {"at": iso(time.time()), "reason": reason, "status": status}
            )

    # -- session tokens -------------------------------------------------------

    def mint_session_token(self) -> str:
        with self._lock:
            cfg = self._config
            generation = self._token_generation
        now = time.time()
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": cfg.app_id,
            "iat": int(now),
            "exp": int(now + cfg.token_ttl_seconds),
            "jti": uuid.uuid4().hex,
            "gen": generation,
        }
        return jwt.encode(claims, cfg.token_secret, algorithm="HS256")

    def check_session_token(self, token: str) -> bool:
        cfg = self._config
        try:
            claims = jwt.decode(
                token,
                cfg.token_secret,
                algorithms=["HS256"],
                issuer=TOKEN_ISSUER,
                options={"verify_exp": False, "require": ["exp", "sub", "gen"]},
            )
        except jwt.PyJWTError:
            return False
        if claims.get("sub") != cfg.app_id:
            return False
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or time.time() >= exp:
            return False
        with self._lock:
            return bool(claims.get("gen") == self._token_generation)

    # -- sessions ---------------------------------------------------------------

    def _expire(self, now: float) -> None:
        """End every live session whose max-duration or idle deadline has passed."""
        if now < self._next_check:
            return
        idle = self._config.idle_timeout_seconds
        next_check = math.inf
        for sid, session in list(self._active.items()):
            end_at, reason = session.max_end_at, "MAX_DURATION_REACHED"
            if idle is not None and session.last_activity_at + idle < end_at:
                end_at, reason = session.last_activity_at + idle, "IDLE_TIMEOUT"
            if end_at <= now:
                session.ended_at = max(end_at, session.created_at)
                session.end_reason = reason
                session.ended_by = "max_duration" if reason == "MAX_DURATION_REACHED" else "idle"
                del self._active[sid]
            else:
                next_check = min(next_check, end_at)
        self._next_check = next_check

    def active_count(self) -> int:
        with self._lock:
            self._expire(time.time())
            return len(self._active)

    def create_session(
        self,
        *,
        avatar_id: str,
        requested_minutes: int | None,
        request_body: Any,
        request_content_type: str | None,
    ) -> _Session | None:
        """Start a session, or return None when the concurrency limit is reached."""
        cfg = self._config
        if requested_minutes is None:
            granted = min(cfg.default_duration_minutes, cfg.plan_max_minutes)
        else:
            granted = min(requested_minutes, cfg.plan_max_minutes)
        session_id = uuid.uuid4().hex
        room_name = f"room-{session_id}"
        identity = f"client-{session_id[:12]}"
        granted_seconds = granted * cfg.seconds_per_minute
        lk_ttl = granted_seconds + cfg.livekit_token_margin_seconds
        livekit_token = (
            livekit_api.AccessToken(cfg.livekit_api_key, cfg.livekit_api_secret)
            .with_identity(identity)
            .with_grants(livekit_api.VideoGrants(room_join=True, room=room_name))
            .with_ttl(timedelta(seconds=lk_ttl))
            .to_jwt()
        )
        lk_exp = float(jwt.decode(livekit_token, options={"verify_signature": False})["exp"])
        with self._lock:
            now = time.time()
            self._expire(now)
            if len(self._active) >= self._config.max_concurrent_sessions:
                return None
            self._seq += 1
            session = _Session(
                session_id=session_id,
                avatar_id=avatar_id,
                seq=self._seq,
                created_at=now,
                granted_minutes=granted,
                requested_minutes=requested_minutes,
                max_end_at=now + granted_seconds,
                voice_id=cfg.voice_id,
                livekit_url=cfg.livekit_url,
                room_name=room_name,
                identity=identity,
                livekit_token=livekit_token,
                livekit_token_expires_at=lk_exp,
                request_body=copy.deepcopy(request_body),
                request_content_type=request_content_type,
                last_activity_at=now,
            )
            self._sessions[session_id] = session
            self._active[session_id] = session
            self._max_active = max(self._max_active, len(self._active))
            self._next_check = min(self._next_check, self._deadline(session))
            return session

    def _deadline(self, session: _Session) -> float:
        idle = self._config.idle_timeout_seconds
        if idle is None:
            return session.max_end_at
        return min(session.max_end_at, session.last_activity_at + idle)

    def _live(self, session_id: str, now: float) -> _Session | Outcome:
        """The session if it still runs, else why not (caller holds the lock)."""
        self._expire(now)
        session = self._sessions.get(session_id)
        if session is None:
            return "unknown"
        if not session.active:
            return "ended"
        return session

    def touch(self, session_id: str, kind: Literal["ping", "talk"]) -> Outcome:
        """Record activity (resets the idle clock; never extends the max duration)."""
        with self._lock:
            now = time.time()
            session = self._live(session_id, now)
            if isinstance(session, str):
                return session
            session.last_activity_at = now
            if kind == "ping":
                session.pings += 1
            else:
                session.talks += 1
            return "ok"

    def end_session(self, session_id: str, reason: str, *, ended_by: str = "stop") -> Outcome:
        with self._lock:
            now = time.time()
            session = self._live(session_id, now)
            if isinstance(session, str):
                return session
            session.ended_at = now
            session.end_reason = reason
            session.ended_by = ended_by
            del self._active[session_id]
            return "ok"

    def _row(self, session: _Session, now: float) -> dict[str, Any]:
        duration = session.duration(now)
        return {
            "sessionId": session.session_id,
            "created_at": iso(session.created_at),
            "updated_at": iso(session.updated_at()),
            "duration": int(duration),
            "source": "api",
            "credits_consumed": round(duration / 60.0 * self._config.credits_per_minute, 2),
        }

    def list_rows(
        self, kind: str | None, page: int, page_size: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """One page of sessions, newest first; ``kind`` is active, historic or None (all)."""
        with self._lock:
            now = time.time()
            self._expire(now)
            if kind == "active":
                chosen = list(self._active.values())
            elif kind == "historic":
                chosen = [s for s in self._sessions.values() if not s.active]
            else:
                chosen = list(self._sessions.values())
            chosen.reverse()
            start = (page - 1) * page_size
            return len(chosen), [self._row(s, now) for s in chosen[start : start + page_size]]

    def detail(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            now = time.time()
            self._expire(now)
            session = self._sessions.get(session_id)
            if session is None:
                return None
            row = self._row(session, now)
            row["end_at"] = iso(session.ended_at)
            row["end_reason"] = session.end_reason
            return row

    # -- admin views ------------------------------------------------------------

    def _admin_view(self, session: _Session, now: float) -> dict[str, Any]:
        body = session.request_body
        unexpected = (
            sorted(k for k in body if k not in DOCUMENTED_START_FIELDS)
            if isinstance(body, dict)
            else []
        )
        return {
            "session_id": session.session_id,
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

    def sessions(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every session ever created (oldest first), as plain dicts."""
        with self._lock:
            now = time.time()
            self._expire(now)
            return [
                self._admin_view(s, now)
                for s in self._sessions.values()
                if status is None or (s.active == (status == "active"))
            ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._expire(time.time())
            endpoints = {
                name: {
                    "calls": st.calls,
                    "statuses": dict(st.statuses),
                    "in_flight": st.in_flight,
                    "max_in_flight": st.max_in_flight,
                    "faults_applied": st.faults_applied,
                    "random_failures": st.random_failures,
                }
                for name, st in self._endpoint_stats.items()
            }
            return {
                "endpoints": endpoints,
                "sessions": {
                    "total": len(self._sessions),
                    "active": len(self._active),
                    "ended": len(self._sessions) - len(self._active),
                    "max_active": self._max_active,
                },
                "stop_calls_unknown": dict(self._stop_calls_unknown),
                "faults_pending": {
                    name: sum(remaining for _, remaining in queue)
                    for name, queue in self._faults.items()
                },
                "token_generation": self._token_generation,
            }
