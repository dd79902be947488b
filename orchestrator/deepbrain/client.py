"""Synchronous, thread-safe client for the DeepBrain AI Streamer API.

One instance is shared by every thread of a worker: it owns one session-token cache and one
``httpx.Client`` per calling thread (:mod:`orchestrator.deepbrain.connections`).

Deadlines: every HTTP request ends within ``timeout_seconds`` in all (not per phase:
:mod:`orchestrator.deepbrain.deadline`), and every call — retries, a token refresh and a 401's
second try included — within the ``deadline`` its caller passes. Every call goes through the
one retry loop of :mod:`orchestrator.deepbrain.retry`.

Authentication: start uses ``Authorization: Bearer <session token>`` (fetched from the token
endpoint, cached, refreshed when its JWT ``exp`` is within ``token_refresh_margin_seconds``, and
once more after a 401); stop, list and detail use ``STUDIO-API-KEY: <userKey>``, where a 401
raises at once. The token endpoint has no auth header; it is fetched inside the start's retry
loop, so its transient failures use the same attempts and backoff.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import certifi
import httpx
from pydantic import SecretStr

from orchestrator.deepbrain import deadline as request_deadline
from orchestrator.deepbrain.auth import SessionTokenCache, required_secret
from orchestrator.deepbrain.connections import PerThreadClients
from orchestrator.deepbrain.envelope import json_bytes, may_have_started, read_list_page, unwrap
from orchestrator.deepbrain.errors import (
    DeepBrainError,
    VendorAuthError,
    VendorConflict,
    VendorNotFound,
    error_from_transport,
)
from orchestrator.deepbrain.models import (
    StartedSession,
    StopOutcome,
    VendorSession,
    parse_started_session,
    parse_vendor_session,
)
from orchestrator.deepbrain.retry import RetryPolicy, call_with_retry
from orchestrator.deepbrain.values import loggable_id

__all__ = ["DeepBrainClient"]

logger = logging.getLogger("orchestrator.deepbrain")

TOKEN_PATH = "/api/v2/sessions/token"  # noqa: S105 -- a URL path, not a password
START_PATH = "/api/v2/sessions/start"
STOP_PATH = "/api/v2/sessions/stop"
LIST_PATH = "/api/v2/sessions"
MAX_PAGES = 10_000  # a vendor whose "next" never ends must not loop us forever


@dataclass
class _StartState:
    masked: frozenset[str] = frozenset()  # the request's secret values
    sent: int = 0
    uncertain: int = 0
    refreshed: bool = False


class DeepBrainClient:
    """Client for token, start, stop, list and detail. Safe to share between threads.

    ``app_id``/``user_key`` may be ``str`` or ``SecretStr``; they are never shown by ``repr``,
    logs or exceptions. ``transport`` replaces the HTTP transport (tests; the total deadline
    per request is then the transport's business); ``sleep`` is called with each retry delay.
    """

    def __init__(
        self,
        base_url: str,
        app_id: str | SecretStr,
        user_key: str | SecretStr,
        *,
        timeout_seconds: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        token_refresh_margin_seconds: float = 60.0,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("DeepBrainClient: timeout_seconds must be positive")
        self._base_url = base_url.rstrip("/")
        self._app_id = required_secret(app_id, "app_id")
        self._user_key = required_secret(user_key, "user_key")
        self._timeout_seconds = timeout_seconds
        self._retry = retry if retry is not None else RetryPolicy()
        self._sleep = sleep
        self._transport = transport
        self._ssl_context = ssl.create_default_context(cafile=certifi.where())
        self._connections = PerThreadClients(self._new_http_client)
        self._tokens = SessionTokenCache(
            self._fetch_token, refresh_margin=token_refresh_margin_seconds
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._base_url!r})"

    __str__ = __repr__

    @property
    def _http(self) -> httpx.Client:
        """This thread's client."""
        return self._connections.get()

    def _new_http_client(self) -> httpx.Client:
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=1)
        transport = self._transport or request_deadline.install(
            httpx.HTTPTransport(verify=self._ssl_context, limits=limits)
        )
        return httpx.Client(
            base_url=self._base_url,
            timeout=httpx.Timeout(self._timeout_seconds),
            limits=limits,
            transport=transport,
            verify=self._ssl_context,
            headers={"Accept": "application/json", "User-Agent": "session-orchestrator"},
            follow_redirects=False,
        )

    def close(self) -> None:
        """Close every thread's connections."""
        self._connections.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start_session(
        self,
        body: Mapping[str, Any],
        *,
        deadline: float | None = None,
        secrets: Iterable[str] = (),
    ) -> StartedSession:
        """``POST /api/v2/sessions/start`` with ``body`` sent as JSON as given.

        Retries connect failures and 429 freely; retries 5xx, read timeouts and dropped
        connections too but logs a WARNING for each (the vendor may have created a session
        the reconciler will stop) and counts them in ``uncertain_attempts``. A 401 fetches a
        new token and resends once; a second 401 raises :class:`VendorAuthError`. Any error
        raised carries ``attempts`` and ``uncertain_attempts``. With ``deadline`` (a
        ``time.monotonic()`` reading) no attempt starts that could not end before it.
        ``secrets``: the secret values ``body`` carries (the customer's keys), masked in any
        text of the vendor's this call keeps (:mod:`orchestrator.masking`).
        """
        endpoint = f"POST {START_PATH}"
        payload = dict(body)
        state = _StartState(masked=frozenset(secrets))
        try:
            started = call_with_retry(
                lambda: self._start_once(payload, state, endpoint, deadline),
                policy=self._retry,
                sleep=self._sleep,
                endpoint=endpoint,
                deadline=deadline,
                attempt_seconds=self._timeout_seconds,
            )
        except DeepBrainError as exc:
            exc.attempts = state.sent
            exc.uncertain_attempts = state.uncertain
            raise
        return replace(started, attempts=state.sent, uncertain_attempts=state.uncertain)

    def stop_session(
        self, session_id: str, reason: str, *, deadline: float | None = None
    ) -> StopOutcome:
        """``POST /api/v2/sessions/stop``. 409/4090 → ALREADY_ENDED, 404/4040 → NOT_FOUND.

        A 404 or 409 that does not carry the vendor's JSON envelope (a proxy or a wrong base
        URL answering) is raised, not taken as an outcome. A 401 raises at once.
        """
        self._require_id(session_id)
        endpoint = f"POST {STOP_PATH}"
        try:
            self._call_with_key(
                "POST",
                STOP_PATH,
                endpoint,
                deadline,
                json={"session_id": session_id, "reason": reason},
            )
        except VendorConflict as exc:
            if exc.code is None:
                raise
            return StopOutcome.ALREADY_ENDED
        except VendorNotFound as exc:
            if exc.code is None:
                raise
            return StopOutcome.NOT_FOUND
        return StopOutcome.STOPPED

    def list_sessions(
        self,
        kind: Literal["active", "historic"] = "active",
        page_size: int = 100,
        *,
        deadline: float | None = None,
        on_malformed: Callable[[str], None] | None = None,
    ) -> list[VendorSession]:
        """``GET /api/v2/sessions``, every page (a session seen twice is kept once).

        A row that is not a session (no id, not an object) raises, unless ``on_malformed`` is
        given: it is then told why, and the row is skipped."""
        if kind not in ("active", "historic"):
            raise ValueError("list_sessions: kind must be 'active' or 'historic'")
        if not 1 <= page_size <= 100:
            raise ValueError("list_sessions: page_size must be between 1 and 100")
        endpoint = f"GET {LIST_PATH}"
        sessions: dict[str, VendorSession] = {}
        for page in range(1, MAX_PAGES + 1):
            data = self._call_with_key(
                "GET",
                LIST_PATH,
                endpoint,
                deadline,
                params={"page": page, "page_size": page_size, "type": kind},
            )
            found, more = read_list_page(data, endpoint, page, on_malformed)
            for session in found:
                sessions.setdefault(session.session_id, session)
            if not more:
                return list(sessions.values())
        raise DeepBrainError(endpoint, f"more than {MAX_PAGES} pages; refusing to go on")

    def get_session(self, session_id: str, *, deadline: float | None = None) -> VendorSession:
        """``GET /api/v2/sessions/{session_id}``; 404 raises :class:`VendorNotFound`."""
        self._require_id(session_id)
        path = f"{LIST_PATH}/{quote(session_id, safe='')}"
        endpoint = f"GET {path}"
        data = self._call_with_key("GET", path, endpoint, deadline)
        return parse_vendor_session(data, endpoint)

    @staticmethod
    def _require_id(session_id: str) -> None:
        if not isinstance(session_id, str) or not session_id.strip():
            raise ValueError("session_id must be a non-empty string")

    def _secrets(self) -> tuple[str, ...]:
        return (self._app_id.get_secret_value(), self._user_key.get_secret_value())

    def _call_with_key(
        self, method: str, path: str, endpoint: str, deadline: float | None, **kwargs: Any
    ) -> Any:
        headers = {"STUDIO-API-KEY": self._user_key.get_secret_value()}
        return call_with_retry(
            lambda: self._send(method, path, endpoint, deadline, headers=headers, **kwargs),
            policy=self._retry,
            sleep=self._sleep,
            endpoint=endpoint,
            deadline=deadline,
        )

    def _fetch_token(self, deadline: float | None = None) -> str:
        """One ``POST /api/v2/sessions/token`` (the caller's retry loop retries it)."""
        endpoint = f"POST {TOKEN_PATH}"
        data = self._send(
            "POST",
            TOKEN_PATH,
            endpoint,
            deadline,
            json={
                "appId": self._app_id.get_secret_value(),
                "userKey": self._user_key.get_secret_value(),
            },
        )
        token = data.get("session_token") if isinstance(data, Mapping) else None
        if not isinstance(token, str) or not token:
            raise DeepBrainError(endpoint, "unexpected reply shape: data.session_token missing")
        return token

    def _start_once(
        self, payload: dict[str, Any], state: _StartState, endpoint: str, deadline: float | None
    ) -> StartedSession:
        # Token failures are not start attempts: nothing was started.
        token = self._tokens.get(lambda: self._fetch_token(deadline))
        try:
            return self._send_start(token, payload, state, endpoint, deadline)
        except VendorAuthError:
            if state.refreshed:
                raise
            state.refreshed = True
            logger.info("deepbrain %s: token rejected (401), fetching a new one", endpoint)
            self._tokens.invalidate(token)
            token = self._tokens.get(lambda: self._fetch_token(deadline))
            return self._send_start(token, payload, state, endpoint, deadline)

    def _send_start(
        self,
        token: str,
        payload: dict[str, Any],
        state: _StartState,
        endpoint: str,
        deadline: float | None,
    ) -> StartedSession:
        state.sent += 1
        try:
            data = self._send(
                "POST",
                START_PATH,
                endpoint,
                deadline,
                headers={"Authorization": f"Bearer {token}"},
                json=payload,
                masked=state.masked,
            )
            return parse_started_session(data, endpoint)
        except DeepBrainError as exc:
            if exc.unusable_session_id is not None and self._stop_unusable(
                exc.unusable_session_id, endpoint, deadline
            ):
                raise
            if may_have_started(exc):
                state.uncertain += 1
                logger.warning(
                    "deepbrain %s: start attempt %d is uncertain (%s): the vendor may have "
                    "created a session; the reconciler stops any orphan",
                    endpoint,
                    state.sent,
                    exc.error_code,
                    extra={"vendor_endpoint": endpoint, "vendor_error_code": exc.error_code},
                )
            raise

    def _stop_unusable(self, session_id: str, endpoint: str, deadline: float | None) -> bool:
        """Stop a session the vendor started whose reply cannot be recorded (nothing would
        own it); False if the stop failed (the reconciler then stops it as an orphan)."""
        try:
            outcome = self.stop_session(session_id, "ERROR", deadline=deadline)
        except DeepBrainError as error:
            logger.error(
                "deepbrain %s: could not stop the session of an unusable start reply (%s); "
                "the reconciler stops it as an orphan",
                endpoint,
                error.error_code,
            )
            return False
        logger.warning(
            "deepbrain %s: stopped the session %s of an unusable start reply (%s)",
            endpoint,
            loggable_id(session_id),
            outcome.value,
        )
        return True

    def _send(
        self,
        method: str,
        path: str,
        endpoint: str,
        deadline: float | None,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        masked: frozenset[str] = frozenset(),
    ) -> Any:
        """One HTTP request, done within ``timeout_seconds`` and the call's ``deadline``;
        returns the envelope's ``data`` or raises a DeepBrainError (whose texts show none of
        our keys nor the ``masked`` values the request carried)."""
        ends_at = time.monotonic() + self._timeout_seconds
        if deadline is not None:
            ends_at = min(ends_at, deadline)
        content = None if json is None else json_bytes(json)
        headers = {**(headers or {}), **({"Content-Type": "application/json"} if content else {})}
        try:
            if ends_at <= time.monotonic():
                raise httpx.ConnectTimeout("the call's deadline has passed; nothing was sent")
            with request_deadline.within(ends_at):
                response = self._http.request(
                    method, path, headers=headers, content=content, params=params
                )
        except httpx.TransportError as exc:
            raise error_from_transport(
                endpoint,
                exc,
                timeout_seconds=self._timeout_seconds,
                secrets=self._secrets(),
                request_secrets=masked,
            ) from exc
        return unwrap(endpoint, response, self._secrets(), masked)
