"""The vendor's credentials: a secret that must not be empty, and a thread-safe cache of the
session token (a JWT of undocumented lifetime)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from pydantic import SecretStr

from orchestrator.jwt_claims import token_expiry

__all__ = ["SessionTokenCache", "required_secret"]


class _Cached(NamedTuple):
    token: str
    expires_at: float | None  # epoch seconds; None when the token has no readable exp


def required_secret(value: str | SecretStr, name: str) -> SecretStr:
    secret = value if isinstance(value, SecretStr) else SecretStr(value)
    if not secret.get_secret_value():
        raise ValueError(f"DeepBrainClient: {name} must not be empty")
    return secret


class SessionTokenCache:
    """Holds one token; ``get`` refreshes it when its exp is within ``refresh_margin`` seconds.

    Only one thread fetches at a time; the others wait for its result. A token without a
    readable ``exp`` is kept until :meth:`invalidate` is called (after a 401).
    """

    def __init__(
        self,
        fetch: Callable[[], str],
        *,
        refresh_margin: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self._refresh_margin = refresh_margin
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: _Cached | None = None
        self._generation = 0  # bumped on every fetch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cached={self._cached is not None})"

    def _usable(self, cached: _Cached | None) -> bool:
        if cached is None:
            return False
        if cached.expires_at is None:
            return True
        return cached.expires_at - self._clock() > self._refresh_margin

    def _expired(self, cached: _Cached) -> bool:
        return cached.expires_at is not None and cached.expires_at <= self._clock()

    def get(self, fetch: Callable[[], str] | None = None) -> str:
        """A token fresh enough to use; fetches one (raising its error) when needed, with
        ``fetch`` if given (a fetch bound to the caller's deadline)."""
        cached = self._cached
        if self._usable(cached):
            assert cached is not None
            return cached.token
        seen = self._generation
        with self._lock:
            cached = self._cached
            if cached is not None and (
                self._usable(cached)
                # Another thread fetched while we waited: take its token even if it is a
                # short-lived one already inside the margin, as long as it has not expired.
                or (self._generation != seen and not self._expired(cached))
            ):
                return cached.token
            token = (fetch or self._fetch)()
            self._cached = _Cached(token, token_expiry(token))
            self._generation += 1
            return token

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (rejected with a 401) unless another thread already replaced it."""
        with self._lock:
            if self._cached is not None and self._cached.token == token:
                self._cached = None
