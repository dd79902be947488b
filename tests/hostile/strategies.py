"""Hypothesis strategies for hostile vendor replies, field by field from :mod:`.schema`.

Values: out-of-range, negative, millisecond-epoch and non-finite numbers, huge integers;
long and NUL-bearing strings (and lone surrogates, which JSON can carry); missing, null,
extra and wrongly typed fields; empty and duplicated ids; pagination that never ends;
bodies that are not JSON or not the envelope; 4xx/5xx/429 with and without Retry-After
(seconds, dates, garbage); connections reset or timed out, before or after the vendor acted;
replies trickled over the real socket a few bytes at a time (each read well within the read
timeout, the whole reply up to minutes) and reset in the middle of their body.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from tests.hostile import schema
from tests.hostile.vendor import (
    MISSING,
    AddRows,
    Drop,
    LoopPages,
    Mutation,
    Reply,
    SetEnvelope,
    SetField,
    Trickle,
)

HUGE_INTS = st.one_of(
    st.integers(min_value=2**63, max_value=10**400),
    st.integers(min_value=-(10**400), max_value=-(2**63)),
)
MS_EPOCH = st.integers(min_value=1_500_000_000_000, max_value=2_500_000_000_000)
NUMBERS = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    HUGE_INTS,
    MS_EPOCH,
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 2**31, 2**63, 1e308, -1e18, 1e-300]),
)
ODD_CHARS = st.sampled_from(["\x00", "\ud800", "é", "\u202e", "\n", "%s", "'", "x"])
STRINGS = st.one_of(
    st.text(max_size=20),
    st.builds(lambda c, n: c * n, ODD_CHARS, st.integers(min_value=65, max_value=20_000)),
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=5), ODD_CHARS, st.text(max_size=5)),
    st.sampled_from(["", " ", "null", "None", "1764600000000", "inf", "NaN"]),
)
TIMESTAMPS = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 2),  # noqa: DTZ001 - naive on purpose, the vendor may send it
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.one_of(st.none(), st.just(UTC), st.timezones()),
    ).map(lambda d: d.isoformat()),
    st.sampled_from(
        ["2026-13-45T99:99:99", "0000-00-00", "9999-12-31T23:59:59+14:00", "yesterday", ""]
    ),
    NUMBERS,
)
WRONG_TYPES = st.one_of(
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
JWTS = st.one_of(
    st.just("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2ln"),  # exp = 1 (1970)
    st.just("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3NjQ2MDAwMDAwMDB9.c2ln"),  # exp in ms
    st.just("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjFlOTk5fQ.c2ln"),  # exp = 1e999 (inf)
    st.just("not.a.jwt"),
)
ANY = st.one_of(NUMBERS, STRINGS, WRONG_TYPES)
_KNOWN = {f.path[0] for r in schema.REPLIES.values() for f in r.fields} | {
    f.path[0] for f in schema.LIST_ROW
}

BY_KIND: dict[schema.Kind, st.SearchStrategy[Any]] = {
    "str": STRINGS,
    "int": NUMBERS,
    "number": NUMBERS,
    "timestamp": TIMESTAMPS,
    "object": WRONG_TYPES,
    "list": WRONG_TYPES,
    "bool": WRONG_TYPES,
    "jwt": st.one_of(JWTS, STRINGS),
}


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """A generated row as sent: MISSING fields left out."""
    return {k: v for k, v in row.items() if v is not MISSING}


def value_for(field: schema.Field) -> st.SearchStrategy[Any]:
    return st.one_of(BY_KIND[field.kind], WRONG_TYPES, st.just(MISSING))


def _field_mutation(reply: schema.Reply, field: schema.Field) -> st.SearchStrategy[Mutation]:
    in_rows = reply.endpoint == "list" and field in schema.LIST_ROW
    return st.builds(SetField, st.just(field.path), value_for(field), st.just(in_rows))


def _field_mutations(endpoint: str) -> st.SearchStrategy[Mutation]:
    reply = schema.REPLIES[endpoint]
    fields = list(reply.fields)
    if endpoint == "list":
        fields += list(schema.LIST_ROW)
    options = [_field_mutation(reply, f) for f in fields]
    extra = st.builds(
        SetField, st.tuples(st.text(min_size=1, max_size=8)), ANY, st.booleans()
    )  # a field the schema does not have
    return st.one_of(*options, extra) if options else extra


ENVELOPE_MUTATIONS = st.one_of(
    st.builds(SetEnvelope, st.just("code"), st.sampled_from(["1000", 1000.0, True, None, MISSING])),
    st.builds(SetEnvelope, st.just("message"), STRINGS),
    st.builds(SetEnvelope, st.just("data"), WRONG_TYPES),
)

RETRY_AFTER = st.one_of(
    st.none(),
    st.sampled_from(["0", "1", "-1", "1e309", "nan", "99999999999", "soon", ""]),
    st.datetimes(
        min_value=datetime(2000, 1, 1),  # noqa: DTZ001
        max_value=datetime(2100, 1, 1),  # noqa: DTZ001
    ).map(lambda d: (d.replace(tzinfo=UTC) + timedelta()).strftime("%a, %d %b %Y %H:%M:%S GMT")),
)
STATUSES = st.one_of(
    st.sampled_from([status for status, _ in schema.ERRORS]),
    st.sampled_from(schema.PROXY_STATUSES),
    st.integers(min_value=200, max_value=599),
)
ERROR_BODIES = st.one_of(
    st.builds(
        lambda code, msg: {"code": code, "message": msg, "data": None},
        st.one_of(st.sampled_from([c for _, c in schema.ERRORS]), NUMBERS, STRINGS),
        STRINGS,
    ),
    st.sampled_from([b"", b"<html>502 Bad Gateway</html>", b"\x00\xff\xfe", b"{", b"null"]),
    st.sampled_from([[], "ok", 1000, {"status": "ok"}]),  # JSON, not the envelope
)
WHOLE_REPLIES = st.one_of(
    st.builds(Reply, STATUSES, ERROR_BODIES, RETRY_AFTER, st.just(False), st.booleans()),
    st.builds(Reply, STATUSES, st.just(None), RETRY_AFTER, st.just(True), st.booleans()),
)
# Pieces of 1-64 bytes, at most 0.6 s apart: below the 1 s read timeout of the hostile
# settings, so only the client's total deadline ends a long one; a reset after 0-300 bytes.
TRICKLES = st.builds(
    Trickle,
    st.integers(min_value=1, max_value=64),
    st.sampled_from([0.0, 0.02, 0.1, 0.3, 0.6]),
    st.one_of(st.none(), st.integers(min_value=0, max_value=300)),
)
DROPS = st.one_of(
    st.builds(Drop, st.sampled_from(["reset", "timeout", "refused"]), st.booleans()), TRICKLES
)

LIST_ONLY = st.one_of(
    st.builds(LoopPages, st.one_of(st.just("next"), STRINGS, NUMBERS)),
    st.builds(
        AddRows,
        st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {"sessionId": st.one_of(st.just(""), STRINGS, NUMBERS, st.none())},
                    optional={f.path[0]: value_for(f) for f in schema.LIST_ROW[1:]},
                ).map(_present),
                ANY,
            ),
            max_size=3,
        ).map(tuple),
        st.booleans(),
    ),
)


def mutation(endpoint: str) -> st.SearchStrategy[Mutation]:
    """One hostile reply of ``endpoint``."""
    choices = [_field_mutations(endpoint), ENVELOPE_MUTATIONS, WHOLE_REPLIES, DROPS]
    if endpoint == "list":
        choices.append(LIST_ONLY)
    return st.one_of(*choices)


def plans(endpoints: tuple[str, ...] = ("token", "start", "stop", "list", "detail"), size: int = 2):
    """Up to ``size`` hostile replies per endpoint, served in order; most endpoints honest."""
    return st.fixed_dictionaries(
        {}, optional={e: st.lists(mutation(e), min_size=1, max_size=size) for e in endpoints}
    )


# Rows of the vendor's list that are not sessions: not an object, no id, an empty or
# non-string id.
JUNK_ROWS = st.one_of(
    WRONG_TYPES,
    STRINGS,
    st.fixed_dictionaries(
        {"sessionId": st.one_of(st.just(""), NUMBERS, WRONG_TYPES)},
        optional={f.path[0]: value_for(f) for f in schema.LIST_ROW[1:]},
    ).map(_present),
)
EXTRA_FIELD = st.builds(
    SetField, st.tuples(st.text(min_size=1, max_size=8).filter(lambda k: k not in _KNOWN)), ANY
)


def lasting_quirks() -> st.SearchStrategy[dict[str, Mutation]]:
    """Quirks a vendor may keep for good and the service must live with: junk rows in its
    list, fields the documentation does not name."""
    return st.fixed_dictionaries(
        {},
        optional={
            "list": st.one_of(
                st.builds(AddRows, st.lists(JUNK_ROWS, min_size=1, max_size=3).map(tuple)),
                st.builds(SetField, EXTRA_FIELD.map(lambda m: m.path), ANY, st.just(True)),
            ),
            "detail": EXTRA_FIELD,
            "start": EXTRA_FIELD,
        },
    )
