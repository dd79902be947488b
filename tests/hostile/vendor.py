"""A hostile vendor at the HTTP boundary: an httpx transport in front of the simulator that
changes the replies the client reads, one scripted change (a :class:`Mutation`) per request.

The simulator behind it still does what each request asks (a start creates a session, a stop
ends one) unless a mutation says the request never arrived (``forward=False``): its own record
of vendor sessions stays the truth the invariants read. The mutations are plain frozen
dataclasses so a shrunk failure prints as the reply that broke the promise.

A :class:`Trickle` is served over the real socket: the simulator sends the reply a few bytes
at a time (its trickle fault), so what ends the request is the client's own deadline, not a
transport of ours. Every request's duration is recorded (``timings``) for the time bounds.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()


def endpoint_of(request: httpx.Request) -> str:
    path = request.url.path.rstrip("/")
    if request.method == "POST":
        return {"token": "token", "start": "start", "stop": "stop"}.get(
            path.rsplit("/", 1)[-1], "other"
        )
    if path.endswith("/api/v2/sessions"):
        return "list"
    return "detail"


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _reply(status: int, body: Any, headers: Mapping[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    kind = "application/octet-stream" if isinstance(body, bytes) else "application/json"
    headers = {"content-type": kind, **(headers or {})}
    return httpx.Response(status, headers=headers, content=content)


def _set(target: Any, path: Sequence[str | int], value: Any) -> None:
    """Set (or with MISSING delete) ``path`` inside ``target``; a path that does not exist is
    created where it can be, ignored where it cannot."""
    for key in path[:-1]:
        if isinstance(target, dict):
            target = target.setdefault(key, {}) if isinstance(key, str) else None
        elif isinstance(target, list) and isinstance(key, int) and key < len(target):
            target = target[key]
        else:
            return
    last = path[-1]
    if isinstance(target, dict) and isinstance(last, str):
        if value is MISSING:
            target.pop(last, None)
        else:
            target[last] = value


class Mutation:
    """One changed reply. ``forward``: the request reaches the vendor (it acts on it)."""

    forward: bool = True

    def serve(self, request: httpx.Request, inner: httpx.BaseTransport) -> httpx.Response:
        response = inner.handle_request(request) if self.forward else None
        if response is not None:
            response.read()
        return self.change(request, response)

    def change(self, request: httpx.Request, response: httpx.Response | None) -> httpx.Response:
        raise NotImplementedError


@dataclass(frozen=True)
class SetField(Mutation):
    """``data.<path> = value`` (MISSING: removed); for the list, in every row of results."""

    path: tuple[str, ...]
    value: Any
    in_rows: bool = False

    def change(self, request: httpx.Request, response: httpx.Response | None) -> httpx.Response:
        assert response is not None
        body = _json(response)
        if isinstance(body, dict):
            data = body.get("data")
            if self.in_rows and isinstance(data, dict) and isinstance(data.get("results"), list):
                for row in data["results"]:
                    _set(row, self.path, self.value)
            elif not self.in_rows:
                _set(body, ("data", *self.path), self.value)
        return _reply(response.status_code, body)


@dataclass(frozen=True)
class SetEnvelope(Mutation):
    """The envelope's own ``code``/``message``/``data`` replaced (MISSING: removed)."""

    name: str
    value: Any

    def change(self, request: httpx.Request, response: httpx.Response | None) -> httpx.Response:
        assert response is not None
        body = _json(response)
        if isinstance(body, dict):
            _set(body, (self.name,), self.value)
        return _reply(response.status_code, body)


@dataclass(frozen=True)
class AddRows(Mutation):
    """Rows added to the list's results (copies of the real ones: duplicated ids)."""

    rows: tuple[Any, ...] = ()
    duplicate: bool = False

    def change(self, request: httpx.Request, response: httpx.Response | None) -> httpx.Response:
        assert response is not None
        body = _json(response)
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, dict) and isinstance(data.get("results"), list):
            extra = list(data["results"]) if self.duplicate else []
            data["results"] = [*data["results"], *extra, *self.rows]
        return _reply(response.status_code, body)


@dataclass(frozen=True)
class LoopPages(Mutation):
    """Every page answers with page 1's rows and a ``next`` that never ends."""

    next_value: Any = "https://vendor.invalid/api/v2/sessions?page=2"

    def serve(self, request: httpx.Request, inner: httpx.BaseTransport) -> httpx.Response:
        first = httpx.Request(
            request.method,
            request.url.copy_set_param("page", "1"),
            headers=request.headers,
            extensions=request.extensions,
        )
        response = inner.handle_request(first)
        response.read()
        return self.change(request, response)

    def change(self, request: httpx.Request, response: httpx.Response | None) -> httpx.Response:
        assert response is not None
        body = _json(response)
        if isinstance(body, dict) and isinstance(body.get("data"), dict):
            body["data"]["next"] = self.next_value
        return _reply(response.status_code, body)


@dataclass(frozen=True)
class Reply(Mutation):
    """A whole reply of our choosing: an error envelope, a body that is not JSON, JSON that is
    not the envelope. ``echo``: the message is the request's own body (a vendor that quotes
    what it was sent)."""

    status: int
    body: Any  # bytes: sent as is; else JSON
    retry_after: str | None = None
    echo: bool = False
    forward: bool = False

    def change(self, request: httpx.Request, response: httpx.Response | None) -> httpx.Response:
        body = self.body
        if self.echo:
            body = {"code": 4000, "message": request.content.decode(errors="replace"), "data": None}
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
        return _reply(self.status, body, headers)


@dataclass(frozen=True)
class Drop(Mutation):
    """No reply: the connection fails (``forward``: after the vendor acted on the request)."""

    error: str = "reset"  # reset | timeout | refused
    forward: bool = True

    def change(self, request: httpx.Request, response: httpx.Response | None) -> httpx.Response:
        if self.error == "timeout":
            raise httpx.ReadTimeout("hostile vendor: no reply", request=request)
        if self.error == "refused" and not self.forward:
            raise httpx.ConnectError("hostile vendor: refused", request=request)
        raise httpx.RemoteProtocolError("hostile vendor: connection reset", request=request)


@dataclass(frozen=True)
class Trickle(Mutation):
    """The vendor's own reply (it acted on the request), its body sent ``chunk`` bytes every
    ``interval`` seconds (each read quick, the whole reply slow), or cut by a connection
    reset after ``reset_after`` bytes. The simulator sends it over the real socket (its
    ``trickle_bytes``/``reset_after_bytes`` fault): no transport of ours bounds the read."""

    chunk: int = 4
    interval: float = 0.1
    reset_after: int | None = None

    def simulator_fault(self, endpoint: str) -> dict[str, Any]:
        return {
            "endpoint": endpoint,
            "trickle_bytes": self.chunk,
            "trickle_interval_seconds": self.interval,
            "reset_after_bytes": self.reset_after,
        }

    def change(self, request: httpx.Request, response: httpx.Response | None) -> httpx.Response:
        assert response is not None  # read in full, within the client's deadline
        return response


@dataclass
class HostileTransport(httpx.BaseTransport):
    """Serves each endpoint's scripted mutations in order, then the simulator's own replies.
    ``heal()`` forgets what is left; ``served`` lists what was applied, for the report;
    ``timings`` how long each request took (endpoint, seconds), the body read included.
    ``push_fault`` queues a fault in the simulator (:class:`Trickle` needs it)."""

    inner: httpx.BaseTransport
    plan: Mapping[str, Sequence[Mutation]] = field(default_factory=dict)
    served: list[tuple[str, Mutation]] = field(default_factory=list)
    # Quirks the vendor keeps for good (healing does not remove them): every reply of the
    # endpoint that no scripted mutation takes.
    lasting: Mapping[str, Mutation] = field(default_factory=dict)
    push_fault: Callable[[Mapping[str, Any]], object] | None = None
    timings: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._queues: dict[str, deque[Mutation]] = {k: deque(v) for k, v in self.plan.items()}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        endpoint = endpoint_of(request)
        began = time.monotonic()
        try:
            response = self._serve(endpoint, request)
            response.read()  # the whole body: a trickle is timed to its end
            return response
        finally:
            self.timings.append((endpoint, time.monotonic() - began))

    def _serve(self, endpoint: str, request: httpx.Request) -> httpx.Response:
        queue = self._queues.get(endpoint)
        if not queue:
            quirk = self.lasting.get(endpoint)
            if quirk is None:
                return self.inner.handle_request(request)
            return quirk.serve(request, self.inner)
        mutation = queue[0] if isinstance(queue[0], LoopPages) else queue.popleft()
        looping = isinstance(mutation, LoopPages) and self.served
        if not looping or self.served[-1][1] is not mutation:  # a loop is listed once
            self.served.append((endpoint, mutation))
        if isinstance(mutation, Trickle):
            if self.push_fault is None:
                raise RuntimeError("a Trickle needs the simulator (push_fault)")
            self.push_fault(mutation.simulator_fault(endpoint))
        return mutation.serve(request, self.inner)

    def script(self, plan: Mapping[str, Sequence[Mutation]]) -> None:
        self.plan = plan
        self._queues = {k: deque(v) for k, v in plan.items()}

    def heal(self) -> None:
        self._queues.clear()

    def close(self) -> None:
        self.inner.close()
