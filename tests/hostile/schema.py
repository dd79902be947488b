"""The vendor's five replies as a schema, from its documentation (docs/architecture.md's
"vendor" section and the start-session page the simulator was written from).

Each field says whether the vendor documents it (``documented=True``: name, type and place in
the reply are on the vendor's pages) or whether we guessed (``documented=False``: the pages are
silent — a unit, an encoding, a reply nobody showed us). The strategies in
:mod:`tests.hostile.strategies` generate hostile values for every field named here, and for
names that are not here at all (extra fields).

Every JSON reply is the envelope ``{"code": int, "data": object|null, "message": str}``;
success is code 1000 with any 2xx (documented for start only: 200, later 201; guessed for the
others).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["str", "int", "number", "timestamp", "object", "list", "bool", "jwt"]


@dataclass(frozen=True)
class Field:
    path: tuple[str, ...]  # inside ``data``
    kind: Kind
    documented: bool
    note: str = ""


@dataclass(frozen=True)
class Reply:
    endpoint: str  # the simulator's endpoint name (orchestrator.simulator.config.ENDPOINTS)
    method: str
    path: str
    auth: str
    fields: tuple[Field, ...]
    note: str = ""


ENVELOPE = (
    Field(("code",), "int", True, "1000 on success; 4000/4010/4020/4030/4040/4090/4290/5000"),
    Field(("message",), "str", True, "free text; may echo what we sent (guessed)"),
    Field(("data",), "object", True, "null on errors"),
)

TOKEN = Reply(
    "token",
    "POST",
    "/api/v2/sessions/token",
    "none (appId/userKey in the body)",
    (
        Field(
            ("session_token",),
            "jwt",
            True,
            "its lifetime is not documented: exp read when present (guessed)",
        ),
    ),
)

START = Reply(
    "start",
    "POST",
    "/api/v2/sessions/start",
    "Authorization: Bearer <session token>",
    (
        Field(("session_id",), "str", True, "named session_id here, sessionId elsewhere"),
        Field(("voice_id",), "str", True, "absent in later revisions"),
        Field(("max_session_duration",), "int", True, "granted length, minutes"),
        Field(("max_session_numbers",), "int", True, "the account's concurrent limit"),
        Field(("livekit",), "object", True),
        Field(("livekit", "url"), "str", True),
        Field(("livekit", "room_name"), "str", True),
        Field(("livekit", "token"), "jwt", True, "a LiveKit access token (exp, video.room, sub)"),
    ),
    "past max_session_numbers: undocumented (4030/4290/4090 plausible)",
)

STOP = Reply(
    "stop",
    "POST",
    "/api/v2/sessions/stop",
    "STUDIO-API-KEY",
    (),
    "data undocumented (guessed: null or {}); 409/4090 = already ended, 404/4040 = unknown",
)

LIST_ROW = (
    Field(("sessionId",), "str", True, "camelCase here"),
    Field(("created_at",), "timestamp", True, "ISO 8601 (the zone is not documented)"),
    Field(("updated_at",), "timestamp", True),
    Field(("duration",), "number", True, "unit not documented (seconds guessed)"),
    Field(("source",), "str", True, "values not documented"),
    Field(("credits_consumed",), "number", True),
)

LIST = Reply(
    "list",
    "GET",
    "/api/v2/sessions?page=&page_size=&type=active|historic",
    "STUDIO-API-KEY",
    (
        Field(("count",), "int", True),
        Field(("next",), "str", True, "a URL or null (its form is guessed)"),
        Field(("previous",), "str", True),
        Field(("results",), "list", True, "rows of LIST_ROW"),
    ),
    "page_size 1-100; the end of the pages is not documented beyond next = null (guessed)",
)

DETAIL = Reply(
    "detail",
    "GET",
    "/api/v2/sessions/{sessionId}",
    "STUDIO-API-KEY",
    (
        *LIST_ROW,
        Field(("end_at",), "timestamp", True, "null while running (guessed)"),
        Field(("end_reason",), "str", True, "vocabulary partly documented; length not"),
    ),
    "404 for another account's or an unknown id",
)

REPLIES: dict[str, Reply] = {r.endpoint: r for r in (TOKEN, START, STOP, LIST, DETAIL)}

# HTTP answers the documentation names (status, code); 429 carries Retry-After in seconds or an
# HTTP date. Which statuses a proxy in front of the vendor may add (502/503/504 with an HTML
# body) is guessed.
ERRORS: tuple[tuple[int, int], ...] = (
    (400, 4000),
    (401, 4010),
    (402, 4020),
    (403, 4030),
    (404, 4040),
    (409, 4090),
    (422, 4000),
    (429, 4290),
    (500, 5000),
)
PROXY_STATUSES: tuple[int, ...] = (502, 503, 504)  # guessed
