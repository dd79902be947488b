"""In-memory vendor state of the simulator: accounts' sessions, tokens, faults and stats.

Every public method takes one lock, so the state can be read and changed from
any thread (the aiohttp loop, a test, a benchmark) while requests run.
Sessions end on their own lazily: before any read or change, sessions past
their max duration or idle deadline are ended *at that deadline*.

Methods that take ``account`` act on that account alone (a session of another
account is "unknown"); ``None`` means the first account (the only one of a
single-account configuration) for writes, and every account for reads.
"""

from __future__ import annotations

import hmac
import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import jwt
from livekit import api as livekit_api

from orchestrator.simulator import tokens
from orchestrator.simulator.accounts import SimulatorAccount
from orchestrator.simulator.config import ENDPOINTS, Fault, SimulatorConfig
from orchestrator.simulator.sessions import (
    DOCUMENTED_START_FIELDS,
    NewSession,
    Outcome,
    SessionBook,
    VendorSession,
    admin_view,
    identity_of,
    iso,
    new_session_id,
    room_name_of,
)
from orchestrator.simulator.stats import CallStats

__all__ = ["DOCUMENTED_START_FIELDS", "Outcome", "SimulatorState", "iso"]


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class SimulatorState:
    """The simulated vendor and its accounts. Thread-safe."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self._lock = threading.RLock()
        self._initial_config = config or SimulatorConfig()
        self._config = self._initial_config
        self._rng = random.Random(self._config.seed)
        self._book = SessionBook()
        self._faults: dict[str, deque[list[Any]]] = {name: deque() for name in ENDPOINTS}
        self._token_generation = 0
        self._generations: dict[str, int] = {}
        self._stats = CallStats()

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
            self._book.recheck()
            return self._config

    def configure_account(self, name: str, **changes: Any) -> SimulatorAccount:
        """Change one account's settings (cap, keys, latency, failure rates,
        ``server_errors``, ``refuse_key``) while requests run."""
        with self._lock:
            self._config = self._config.with_account_changes(name, **changes)
            account = self._config.account(name)
            if account is None:  # pragma: no cover - with_account_changes checked the name
                raise ValueError(f"no account named {name!r}")
            return account

    def accounts(self) -> list[SimulatorAccount]:
        return list(self._config.account_list())

    def reset(self, *, restore_config: bool = False) -> None:
        """Forget sessions, faults and stats; reseed the RNG (revoked tokens stay revoked)."""
        with self._lock:
            if restore_config:
                self._config = self._initial_config
            self._rng = random.Random(self._config.seed)
            self._book.clear()
            for queue in self._faults.values():
                queue.clear()
            self._stats = CallStats()

    def revoke_tokens(self, account: str | None = None) -> int:
        """Invalidate every session token minted so far (of ``account`` alone when given);
        returns the new generation."""
        with self._lock:
            self._token_generation += 1
            names = [account] if account is not None else [a.name for a in self.accounts()]
            for name in names:
                self._generations[name] = self._generations.get(name, 0) + 1
            return self._token_generation

    # -- who is calling ---------------------------------------------------------

    def account_with_app_id(self, app_id: str) -> SimulatorAccount | None:
        matches = [a for a in self._config.account_list() if _same(app_id, a.app_id)]
        return matches[0] if matches else None

    def account_with_user_key(self, user_key: str) -> SimulatorAccount | None:
        """The account of a ``STUDIO-API-KEY`` (every key compared: no timing hint)."""
        matches = [a for a in self._config.account_list() if _same(user_key, a.user_key)]
        return matches[0] if matches else None

    def _account_or_first(self, account: str | None) -> SimulatorAccount:
        if account is None:
            return self._config.account_list()[0]
        chosen = self._config.account(account)
        if chosen is None:
            raise ValueError(f"no account named {account!r}")
        return chosen

    # -- faults -------------------------------------------------------------

    def push_fault(self, fault: Fault | Mapping[str, Any]) -> Fault:
        parsed = fault if isinstance(fault, Fault) else Fault.from_dict(fault)
        with self._lock:
            if parsed.account is not None and self._config.account(parsed.account) is None:
                raise ValueError(f"fault account {parsed.account!r} is not served")
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

    def take_fault(self, endpoint: str, account: str | None = None) -> Fault | None:
        """The first fault queued for ``endpoint`` that applies to ``account``."""
        with self._lock:
            queue = self._faults[endpoint]
            for entry in queue:
                fault: Fault = entry[0]
                if fault.account is not None and fault.account != account:
                    continue
                entry[1] -= 1
                if entry[1] <= 0:
                    queue.remove(entry)
                self._stats.endpoints[endpoint].faults_applied += 1
                return fault
            return None

    def roll_failure(self, endpoint: str, account: str | None = None) -> bool:
        with self._lock:
            rate = self._config.failure_rate_for(endpoint, account)
            if rate <= 0:
                return False
            failed = self._rng.random() < rate
            if failed:
                self._stats.endpoints[endpoint].random_failures += 1
            return failed

    # -- request accounting -----------------------------------------------------

    def begin_request(self, endpoint: str) -> None:
        with self._lock:
            self._stats.begin(endpoint)

    def end_request(self, endpoint: str, status: int | str) -> None:
        """``status``: the HTTP status, or "dropped" / "cancelled" when none was sent."""
        with self._lock:
            self._stats.end(endpoint, status)

    def record_account_call(self, account: str, endpoint: str, status: int | str) -> None:
        with self._lock:
            self._stats.account_call(account, endpoint, status)

    def record_stop_call(
        self, session_id: str, reason: Any, status: int | str, account: str | None = None
    ) -> None:
        """Count a stop call naming ``session_id``, whatever its outcome (401/404/409/5xx too);
        a session of another account than the caller's counts as unknown."""
        with self._lock:
            session = self._book.find(session_id, account)
            if session is None:
                unknown = self._stats.stop_calls_unknown
                unknown[session_id] = unknown.get(session_id, 0) + 1
                return
            session.stop_calls += 1
            session.stop_requests.append(
                {"at": iso(time.time()), "reason": reason, "status": status}
            )

    # -- session tokens -------------------------------------------------------

    def mint_session_token(self, account: str | None = None) -> str:
        with self._lock:
            cfg = self._config
            chosen = self._account_or_first(account)
            generation = self._generations.get(chosen.name, 0)
        return tokens.mint(cfg.token_secret, chosen, cfg.token_ttl_seconds, generation)

    def check_session_token(self, token: str) -> str | None:
        """The account a valid, unexpired, unrevoked token was minted for, or None."""
        cfg = self._config
        claimed = tokens.claimed_account(cfg.token_secret, token)
        if claimed is None:
            return None
        name, app_id, generation = claimed
        account = cfg.account(name)
        if account is None or account.app_id != app_id:
            return None
        with self._lock:
            return name if generation == self._generations.get(name, 0) else None

    # -- sessions ---------------------------------------------------------------

    def _expire(self, now: float) -> None:
        self._book.expire(now, self._config.idle_timeout_seconds)

    def active_count(self, account: str | None = None) -> int:
        with self._lock:
            self._expire(time.time())
            return self._book.live_count(account)

    def create_session(
        self,
        *,
        avatar_id: str,
        requested_minutes: int | None,
        request_body: Any,
        request_content_type: str | None,
        account: str | None = None,
    ) -> VendorSession | None:
        """Start a session, or return None when the account's concurrency limit is reached."""
        cfg = self._config
        chosen = self._account_or_first(account)
        if requested_minutes is None:
            granted = min(cfg.default_duration_minutes, cfg.plan_max_minutes)
        else:
            granted = min(requested_minutes, cfg.plan_max_minutes)
        granted_seconds = granted * cfg.seconds_per_minute
        session_id = new_session_id()
        livekit_token = (
            livekit_api.AccessToken(cfg.livekit_api_key, cfg.livekit_api_secret)
            .with_identity(identity_of(session_id))
            .with_grants(livekit_api.VideoGrants(room_join=True, room=room_name_of(session_id)))
            .with_ttl(timedelta(seconds=granted_seconds + cfg.livekit_token_margin_seconds))
            .to_jwt()
        )
        lk_exp = float(jwt.decode(livekit_token, options={"verify_signature": False})["exp"])
        new = NewSession(
            account=chosen.name,
            avatar_id=avatar_id,
            granted_minutes=granted,
            requested_minutes=requested_minutes,
            granted_seconds=granted_seconds,
            voice_id=cfg.voice_id,
            livekit_url=cfg.livekit_url,
            livekit_token=livekit_token,
            livekit_token_expires_at=lk_exp,
            request_body=request_body,
            request_content_type=request_content_type,
            session_id=session_id,
        )
        with self._lock:
            cap = self._account_or_first(chosen.name).max_concurrent_sessions
            return self._book.create(new, time.time(), cap, self._config.idle_timeout_seconds)

    def touch(
        self, session_id: str, kind: Literal["ping", "talk"], account: str | None = None
    ) -> Outcome:
        """Record activity (resets the idle clock; never extends the max duration)."""
        with self._lock:
            now = time.time()
            self._expire(now)
            session = self._book.live(session_id, account)
            if isinstance(session, str):
                return session
            session.last_activity_at = now
            if kind == "ping":
                session.pings += 1
            else:
                session.talks += 1
            return "ok"

    def end_session(
        self, session_id: str, reason: str, *, ended_by: str = "stop", account: str | None = None
    ) -> Outcome:
        with self._lock:
            now = time.time()
            self._expire(now)
            session = self._book.live(session_id, account)
            if isinstance(session, str):
                return session
            self._book.end(session, now, reason, ended_by)
            return "ok"

    def list_rows(
        self, kind: str | None, page: int, page_size: int, account: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """One page of ``account``'s sessions, newest first; ``kind`` is active, historic or
        None (all)."""
        with self._lock:
            now = time.time()
            self._expire(now)
            chosen = self._book.chosen(kind, account)
            chosen.reverse()
            start = (page - 1) * page_size
            credits = self._config.credits_per_minute
            return len(chosen), [
                s.list_row(now, credits) for s in chosen[start : start + page_size]
            ]

    def detail(self, session_id: str, account: str | None = None) -> dict[str, Any] | None:
        with self._lock:
            now = time.time()
            self._expire(now)
            session = self._book.find(session_id, account)
            if session is None:
                return None
            row = session.list_row(now, self._config.credits_per_minute)
            row["end_at"] = iso(session.ended_at)
            row["end_reason"] = session.end_reason
            return row

    # -- admin views ------------------------------------------------------------

    def sessions(
        self, status: str | None = None, account: str | None = None
    ) -> list[dict[str, Any]]:
        """Every session ever created (oldest first, of ``account`` when given), as dicts."""
        with self._lock:
            now = time.time()
            self._expire(now)
            return [
                admin_view(s, now)
                for s in self._book.sessions.values()
                if (status is None or (s.active == (status == "active")))
                and (account is None or s.account == account)
            ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._expire(time.time())
            book, st = self._book, self._stats
            total = len(book.sessions)
            active = book.live_count()
            accounts = {}
            for account in self._config.account_list():
                view = st.account_view(account.name)
                view["sessions"] = {
                    "active": book.live_count(account.name),
                    "max_active": book.max_active_by_account.get(account.name, 0),
                    "limit": account.max_concurrent_sessions,
                }
                accounts[account.name] = view
            return {
                "endpoints": {name: es.to_dict() for name, es in st.endpoints.items()},
                "sessions": {
                    "total": total,
                    "active": active,
                    "ended": total - active,
                    "max_active": book.max_active,
                },
                "accounts": accounts,
                "stop_calls_unknown": dict(st.stop_calls_unknown),
                "faults_pending": {
                    name: sum(remaining for _, remaining in queue)
                    for name, queue in self._faults.items()
                },
                "token_generation": self._token_generation,
            }
