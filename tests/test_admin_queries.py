"""Admin views (migration 0002) and docs/admin-queries.sql on real Postgres, with known data.

Everything runs in one transaction, so ``now()`` is the same instant for the data and for
every query: the expected answers are exact. The transaction is rolled back at the end.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, create_engine, inspect, text
from sqlalchemy.exc import ProgrammingError

from orchestrator.db import Database, OutboxEvent, SessionEvent, SessionRow
from orchestrator.db.engine import normalize_database_url
from orchestrator.db.migrate import check, downgrade, upgrade
from orchestrator.webhooks.models import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSecret,
)
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.postgres

DOCS = Path(__file__).resolve().parent.parent / "docs"
QUERIES_FILE = DOCS / "admin-queries.sql"
ADMIN_DOC = DOCS / "admin.md"
VIEWS_0002 = {
    "admin_live_sessions",
    "admin_sessions_by_avatar",
    "admin_duration_distribution",
    "admin_failures_by_error_code",
    "admin_end_reasons",
    "admin_concurrency",
    "admin_waiting_queue",
    "admin_stuck",
}
VIEWS = VIEWS_0002 | {"admin_webhook_endpoints", "admin_waiting_estimates"}  # 0008, 0011
TABLES_0001 = {"sessions", "session_events", "event_outbox"}
TABLES = TABLES_0001 | {
    "early_stops",
    "sweep_leases",
    "schema_compatibility",
    "vendor_accounts",
    "webhook_endpoints",
    "webhook_secrets",
    "webhook_deliveries",
    "webhook_attempts",
    "tenants",
    "tenant_usage",
    "tenant_account_usage",
    "wait_estimates",
}  # 0004 to 0012
SECRET = "SECRET"  # in every secret value inserted below; no view or query may show it
FORBIDDEN_COLUMN = re.compile(r"token|payload|secret|claim|traceparent|password|sha256")
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def load_queries() -> dict[str, str]:
    """``-- name: <slug>`` blocks of docs/admin-queries.sql, in file order."""
    parts = re.split(r"^-- name: *(\S+) *$", QUERIES_FILE.read_text(), flags=re.MULTILINE)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        assert name not in queries, f"two queries named {name}"
        lines = body.strip().splitlines()
        assert lines[0].startswith("-- ") and len(lines[0]) > 10, f"{name}: no comment line"
        assert body.strip().endswith(";") and body.count(";") == 1, f"{name}: one statement"
        queries[name] = body.strip()
    return queries


QUERIES = load_queries()


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def col(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def pick(self, *names: str) -> list[tuple[Any, ...]]:
        idx = [self.columns.index(n) for n in names]
        return [tuple(r[i] for i in idx) for r in self.rows]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


def run(conn: Connection, sql: str, request_id: str = "a1") -> Result:
    """Run a query as psql would: ``:'request_id'`` becomes a bound parameter."""
    params = {"request_id": request_id} if ":'request_id'" in sql else {}
    result = conn.execute(text(sql.replace(":'request_id'", ":request_id")), params)
    return Result(list(result.keys()), [tuple(r) for r in result])


def view(conn: Connection, name: str) -> Result:
    return run(conn, f"SELECT * FROM {name}")


def assert_no_secret(name: str, result: Result) -> None:
    for column in result.columns:
        assert not FORBIDDEN_COLUMN.search(column), f"{name} has a column {column}"
    for row in result.rows:
        for value in row:
            assert SECRET not in str(value), f"{name} shows a secret: {row}"


# --- the data ---------------------------------------------------------------------------


@dataclass
class Scenario:
    conn: Connection
    now: datetime
    ids: dict[str, uuid.UUID] = field(default_factory=dict)
    spans: list[tuple[datetime, datetime | None]] = field(default_factory=list)

    def at(self, seconds: float) -> datetime:
        return self.now + s(seconds)

    def add(
        self, request_id: str, status: str, avatar: str | None, created: float, **values: Any
    ) -> None:
        """One ``sessions`` row; times in seconds relative to now; secrets in every row."""
        row: dict[str, Any] = {
            "id": uuid.uuid4(),
            "request_id": request_id,
            "status": status,
            "avatar_id": avatar,
            "request_payload": {
                "avatar_id": avatar,
                "avatar_persona": {
                    "llm_configurations": {
                        "custom_http": {"headers": {"Authorization": f"Bearer sk-{SECRET}"}}
                    }
                },
            },
            "payload_sha256": f"{SECRET}-sha",
            "claim_id": f"claim-{SECRET}-{request_id}",
            "livekit_token": f"tok-{SECRET}-{request_id}",
            "traceparent": f"00-{SECRET}-{request_id}-01",
            "created_at": self.at(created),
            "stop_attempts": 0,
            "attempts": 0,
        }
        for key, value in values.items():
            row[key] = self.at(value) if key.endswith("_at") and value is not None else value
        if row.get("started_at") is not None:
            row.setdefault("vendor_session_id", f"v-{request_id}")
            row.setdefault("livekit_room", f"room-{request_id}")
            self.spans.append((row["started_at"], row.get("ended_at")))
        self.conn.execute(SessionRow.__table__.insert(), row)
        self.ids[request_id] = row["id"]

    def event(
        self,
        kind: str,
        occurred: float | datetime,
        of: str | None = None,
        vendor: str | None = None,
        **detail: Any,
    ) -> None:
        """One ``session_events`` row for the row of request ``of`` (None: no row)."""
        self.conn.execute(
            SessionEvent.__table__.insert(),
            {
                "session_id": self.ids[of] if of else None,
                "vendor_session_id": vendor,
                "occurred_at": occurred if isinstance(occurred, datetime) else self.at(occurred),
                "kind": kind,
                "detail": detail,
            },
        )


def build(sc: Scenario) -> None:
    h = 3600
    sc.conn.execute(text("INSERT INTO tenants (name, maximum) VALUES ('quiet', 3)"))
    # waiting
    sc.add("w1", "waiting", "anna", -300, start_deadline_at=60)
    sc.add("w2", "waiting", "anna", -120, start_deadline_at=-5)
    sc.add("w3", "waiting", "ben", -30, start_deadline_at=600)
    # starting: s1 overdue (last attempt 3 min ago), s2 fresh with a stop asked for
    sc.add("s1", "starting", "anna", -600, start_sent_at=-180, attempts=1)
    sc.add(
        "s2",
        "starting",
        "ben",
        -90,
        start_sent_at=-60,
        attempts=1,
        stop_requested_at=-10,
        end_reason="USER_CLOSED",
    )
    # active: a1 in time, a2 30 s overdue, a3 90 s overdue (past_expiry)
    sc.add(
        "a1",
        "active",
        "anna",
        -1000,
        start_sent_at=-905,
        started_at=-900,
        expires_at=300,
        attempts=1,
        max_session_numbers=8,
        metadata={"customer": "acme"},
    )
    sc.add(
        "a2", "active", "ben", -200, started_at=-100, expires_at=-30, max_session_numbers=5
    )  # the latest start: its max_session_numbers is the vendor's cap
    sc.add("a3", "active", "cara", -1300, started_at=-1200, expires_at=-90, max_session_numbers=6)
    # stopping: p1's vendor stop failed 3 times; p2 stopping for 5 s, no failure
    sc.add(
        "p1",
        "stopping",
        "anna",
        -4100,
        started_at=-4000,
        expires_at=-450,
        stop_requested_at=-450,
        stop_retry_at=20,
        stop_attempts=3,
        end_reason="MAX_DURATION_REACHED",
    )
    sc.add(
        "p2",
        "stopping",
        "ben",
        -800,
        started_at=-700,
        expires_at=-5,
        stop_requested_at=-5,
        end_reason="MAX_DURATION_REACHED",
    )
    # ended: durations 30, 120, 600 (anna), 1200, 2400, 4000 (ben), 60, 300 (cara);
    # e7 never started; e4 lies before the last 24 h, e5 straddles its start
    for rid, avatar, started, seconds, reason, expires in [
        ("e1", "anna", -2 * h, 30, "USER_CLOSED", None),
        ("e2", "anna", -3 * h, 120, "MAX_DURATION_REACHED", 120),
        ("e3", "anna", -5 * h, 600, "IDLE_TIMEOUT", None),
        ("e4", "ben", -26 * h, 1200, "USER_CLOSED", None),
        ("e5", "ben", -24 * h - 1200, 2400, "MAX_DURATION_REACHED", 2400),
        ("e6", "ben", -10 * h, 4000, "MAX_DURATION_REACHED", 3600),  # 400 s past expiry
        ("e8", "cara", -h, 60, "IDLE_TIMEOUT", None),
        ("e9", "cara", -h + 30, 300, "USER_CLOSED", None),
    ]:
        sc.add(
            rid,
            "ended",
            avatar,
            started - 10,
            started_at=started,
            ended_at=started + seconds,
            expires_at=started + (expires if expires is not None else 3600),
            end_reason=reason,
            max_session_numbers=9,
        )
    sc.add("e7", "ended", "cara", -60, ended_at=-50, end_reason="USER_CLOSED")
    # failed
    for rid, avatar, ended, code, message in [
        ("f1", "anna", -h, "VENDOR_4020", "out of credits (4020)"),
        ("f2", "ben", -10 * 24 * h, "VENDOR_4020", "out of credits, long ago"),
        ("f3", "ben", -60, "CAPACITY_TIMEOUT", "no free session slot before the deadline"),
        ("f4", None, -8 * 24 * h, "VALIDATION_ERROR", "unknown keys: colour"),
        ("f5", "cara", -30 * 24 * h, "START_TIMEOUT", "no vendor answer recorded"),
    ]:
        sc.add(
            rid,
            "failed",
            avatar,
            ended - 100,
            ended_at=ended,
            error_code=code,
            error_message=message,
        )

    # events
    sc.event("created", -1000, "a1", live=0, cap=10, claim_id=f"claim-{SECRET}-a1")
    sc.event("start_attempt", -905, "a1", attempt=1)
    sc.event("active", -900, "a1", "v-a1", attempt=1)
    sc.event("compensated", -895, None, "v-extra-a1", request_id="a1", why="row moved on")
    sc.event("compensated", -8 * 24 * h, None, "v-extra-e2", request_id="e2", why="db down")
    for attempt, when in [(1, -400), (2, -200), (3, -40)]:
        sc.event(
            "stop_attempt_failed", when, "p1", "v-p1", attempt=attempt, error=f"503 ({attempt})"
        )
    sc.event("stop_attempt_failed", -2 * 24 * h, "e6", "v-e6", attempt=1, error="old")
    midnight = sc.now.replace(hour=0, minute=0, second=0, microsecond=0)
    sc.event(
        "orphan_stopped",
        sc.now,
        None,
        "v-orphan-today",
        reason="ZOMBIE_SESSION_REAP",
        vendor_outcome="stopped",
        vendor_created_at="2026-01-01T00:00:00Z",
    )
    sc.event(
        "orphan_stopped",
        midnight - s(1),
        None,
        "v-orphan-yesterday",
        reason="ZOMBIE_SESSION_REAP",
        vendor_outcome="stopped",
        vendor_created_at=None,
    )
    note = "same request_id with a different payload; the repeat was ignored"
    sc.event("duplicate_conflict", -100, "w1", claim_id=f"claim-{SECRET}-2", note=note)
    sc.event("duplicate_conflict", -50, "f3", claim_id=f"claim-{SECRET}-3", error="bad avatar")
    sc.event("duplicate_conflict", -9 * 24 * h, "e1", claim_id=f"claim-{SECRET}-4", note=note)

    # wait estimates (migration 0011): w1 next, w2 after it; w3 not estimated yet
    for request_id, position, p50, p90, sent in [
        ("w1", 1, 12.5, 40.0, 2),
        ("w2", 2, 70.0, None, 1),
    ]:
        sc.conn.execute(
            text(
                "INSERT INTO wait_estimates (session_id, position, p50_seconds, p90_seconds,"
                " estimated_at, sent_at, sent_count) VALUES (:id, :position, :p50, :p90,"
                " :at, :at, :sent)"
            ),
            {
                "id": sc.ids[request_id],
                "position": position,
                "p50": p50,
                "p90": p90,
                "at": sc.at(-3),
                "sent": sent,
            },
        )

    # outbox: one published (its body holds a token), two waiting for the broker
    for routing_key, created, published in [
        ("session.active", -900, -899),
        ("session.ended", -20, None),
        ("session.failed", -5, None),
    ]:
        sc.conn.execute(
            OutboxEvent.__table__.insert(),
            {
                "event_id": uuid.uuid4(),
                "routing_key": routing_key,
                "body": {"token": f"tok-{SECRET}-outbox"},
                "created_at": sc.at(created),
                "published_at": sc.at(published) if published is not None else None,
                "traceparent": f"00-{SECRET}-outbox-01",
            },
        )
    build_webhooks(sc)


def build_webhooks(sc: Scenario) -> None:
    """Two endpoints: ``ok`` (enabled, a rotation under way, one delivery pending after a
    500, one delivered) and ``gone`` (disabled after a 410 an hour ago); secrets hold SECRET."""
    h = 3600
    ok, gone = uuid.uuid4(), uuid.uuid4()
    sc.ids["ep-ok"], sc.ids["ep-gone"] = ok, gone
    for endpoint, url, created, disabled, reason, failing in [
        (ok, "https://ok.example.com/in", -2 * h, None, None, -60),
        (gone, "https://gone.example.com/in", -3 * h, -h, "gone", -h),
    ]:
        sc.conn.execute(
            WebhookEndpoint.__table__.insert(),
            {
                "id": endpoint,
                "url": url,
                "event_types": ["session.active", "session.ended"],
                "created_at": sc.at(created),
                "disabled_at": sc.at(disabled) if disabled is not None else None,
                "disabled_reason": reason,
                "failing_since": sc.at(failing),
            },
        )
    for endpoint, expires in [(ok, 600), (ok, None), (ok, -60), (gone, None)]:
        sc.conn.execute(
            WebhookSecret.__table__.insert(),
            {
                "endpoint_id": endpoint,
                "ciphertext": f"gAAAA-{SECRET}",
                "expires_at": sc.at(expires) if expires is not None else None,
            },
        )
    outbox = sc.conn.execute(text("SELECT id, event_id::text FROM event_outbox ORDER BY id")).all()
    deliveries = [
        (ok, outbox[0], "delivered", 1, -899),
        (ok, outbox[1], "pending", 1, None),
        (gone, outbox[0], "given_up", 1, -h),
        (gone, outbox[1], "given_up", 0, -h),
    ]
    for n, (endpoint, (outbox_id, event_id), status, attempts, finished) in enumerate(deliveries):
        delivery = sc.conn.execute(
            WebhookDelivery.__table__.insert().returning(WebhookDelivery.id),
            {
                "endpoint_id": endpoint,
                "outbox_id": outbox_id,
                "webhook_id": event_id,
                "event_type": "session.active" if n % 2 == 0 else "session.ended",
                "order_key": "a1",
                "status": status,
                "attempts": attempts,
                "next_attempt_at": sc.at(5),
                "finished_at": sc.at(finished) if finished is not None else None,
            },
        ).scalar_one()
        if attempts:
            code, when, error = {
                0: (204, -899, None),
                1: (500, -60, "HTTP 500"),
                2: (410, -h, "HTTP 410"),
            }[n]
            sc.conn.execute(
                WebhookAttempt.__table__.insert(),
                {
                    "delivery_id": delivery,
                    "attempted_at": sc.at(when),
                    "status_code": code,
                    "duration_ms": 40 + n,
                    "error": error,
                },
            )


@contextmanager
def one_transaction(db: Database) -> Iterator[Connection]:
    """Rolled back at the end; ``now()`` is the same instant throughout."""
    with db.engine.connect() as conn:
        conn.begin()
        conn.execute(text("SET LOCAL TIME ZONE 'UTC'"))
        try:
            yield conn
        finally:
            conn.rollback()


@pytest.fixture
def scenario(db: Database) -> Iterator[Scenario]:
    with one_transaction(db) as conn:
        sc = Scenario(conn, conn.execute(text("SELECT now()")).scalar_one())
        build(sc)
        yield sc


@pytest.fixture
def empty(db: Database) -> Iterator[Connection]:
    with one_transaction(db) as conn:
        yield conn


# --- expected answers -------------------------------------------------------------------


def expected_concurrency(sc: Scenario) -> list[tuple[datetime, int]]:
    """Brute force: sessions whose [started_at, ended_at or now) overlaps each minute."""
    last = sc.now.replace(second=0, microsecond=0)
    minute, rows = last - DAY, []
    while minute <= last:
        live = sum(
            1 for start, end in sc.spans if start < minute + MINUTE and (end or sc.now) > minute
        )
        rows.append((minute, live))
        minute += MINUTE
    return rows


def check_live_sessions(sc: Scenario, r: Result) -> None:
    assert r.pick("request_id", "status", "seconds_left", "age", "stop_reason") == [
        ("p1", "stopping", -450, s(4100), "MAX_DURATION_REACHED"),
        ("a3", "active", -90, s(1300), None),
        ("a1", "active", 300, s(1000), None),
        ("p2", "stopping", -5, s(800), "MAX_DURATION_REACHED"),
        ("s1", "starting", None, s(600), None),
        ("w1", "waiting", None, s(300), None),
        ("a2", "active", -30, s(200), None),
        ("w2", "waiting", None, s(120), None),
        ("s2", "starting", None, s(90), "USER_CLOSED"),
        ("w3", "waiting", None, s(30), None),
    ]
    a1 = r.dicts()[2]
    assert a1 == {
        "request_id": "a1",
        "status": "active",
        "avatar_id": "anna",
        "vendor_session_id": "v-a1",
        "livekit_room": "room-a1",
        "created_at": sc.at(-1000),
        "start_deadline_at": None,
        "started_at": sc.at(-900),
        "expires_at": sc.at(300),
        "seconds_left": 300,
        "stop_requested_at": None,
        "stop_reason": None,
        "stop_attempts": 0,
        "start_attempts": 1,
        "age": s(1000),
        "metadata": {"customer": "acme"},
    }
    assert r.pick("request_id", "stop_attempts", "start_deadline_at")[0] == ("p1", 3, None)


def check_by_avatar(sc: Scenario, r: Result) -> None:
    assert r.pick(
        "avatar_id",
        "total",
        "waiting",
        "live",
        "ended",
        "failed",
        "avg_duration_seconds",
        "p50_duration_seconds",
        "last_request_at",
    ) == [
        ("anna", 9, 2, 3, 3, 1, Decimal("250.0"), Decimal("120.0"), sc.at(-120)),
        ("ben", 9, 1, 3, 3, 2, Decimal("2533.3"), Decimal("2400.0"), sc.at(-30)),
        ("cara", 5, 0, 1, 3, 1, Decimal("180.0"), Decimal("180.0"), sc.at(-60)),
        (None, 1, 0, 0, 0, 1, None, None, sc.at(-8 * 86400 - 100)),
    ]


def check_distribution(_sc: Scenario, r: Result) -> None:
    assert r.rows == [
        (1, "< 1 min", None, 60, 1, Decimal("12.5")),
        (2, "1-5 min", 60, 300, 2, Decimal("25.0")),  # 60 s and 120 s
        (3, "5-15 min", 300, 900, 2, Decimal("25.0")),  # 300 s and 600 s
        (4, "15-30 min", 900, 1800, 1, Decimal("12.5")),
        (5, "30-60 min", 1800, 3600, 1, Decimal("12.5")),
        (6, "60+ min", 3600, None, 1, Decimal("12.5")),
    ]


def check_failures(sc: Scenario, r: Result) -> None:
    assert r.rows == [
        ("VENDOR_4020", 1, 2, sc.at(-3600), "out of credits (4020)"),
        ("CAPACITY_TIMEOUT", 1, 1, sc.at(-60), "no free session slot before the deadline"),
        ("START_TIMEOUT", 0, 1, sc.at(-30 * 86400), "no vendor answer recorded"),
        ("VALIDATION_ERROR", 0, 1, sc.at(-8 * 86400), "unknown keys: colour"),
    ]


def check_end_reasons(sc: Scenario, r: Result) -> None:
    assert r.rows == [
        ("USER_CLOSED", 4, 4, sc.at(-50)),
        ("MAX_DURATION_REACHED", 3, 3, sc.at(-3 * 3600 + 120)),
        ("IDLE_TIMEOUT", 2, 2, sc.at(-3600 + 60)),
    ]


def check_concurrency(sc: Scenario, r: Result) -> None:
    expected = expected_concurrency(sc)
    assert r.columns == ["minute", "live_sessions", "vendor_cap"]
    assert r.pick("minute", "live_sessions") == expected
    assert len(r.rows) == 24 * 60 + 1
    assert set(r.col("vendor_cap")) == {5}
    # by hand: e5 overlaps the first minute; a1, a2, a3, p1, p2 run now; peak 3 at ~T-59 min
    assert r.rows[0][1] == 1 and r.rows[-1][1] == 5
    minute_of = dict(expected)
    assert minute_of[sc.at(-3560).replace(second=0, microsecond=0)] == 3  # e8, e9, p1


def check_waiting_queue(sc: Scenario, r: Result) -> None:
    assert r.dicts() == [
        {
            "waiting": 3,
            "oldest_created_at": sc.at(-300),
            "oldest_wait": s(300),
            "oldest_wait_seconds": 300,
            "with_deadline": 3,
            "next_deadline_at": sc.at(-5),
            "past_deadline": 1,
        }
    ]


def check_stuck(sc: Scenario, r: Result) -> None:
    assert r.pick("problem", "request_id", "status", "stuck_for") == [
        ("stop_failing", "p1", "stopping", s(450)),
        ("start_overdue", "s1", "starting", s(180)),
        ("past_expiry", "a3", "active", s(90)),
    ]
    p1 = r.dicts()[0]
    assert (p1["stop_attempts"], p1["next_stop_retry_at"], p1["stop_reason"]) == (
        3,
        sc.at(20),
        "MAX_DURATION_REACHED",
    )
    assert (p1["last_stop_error"], p1["last_stop_error_at"]) == ("503 (3)", sc.at(-40))
    assert r.dicts()[1]["last_stop_error"] is None


def check_webhook_endpoints_view(sc: Scenario, r: Result) -> None:
    assert r.pick(
        "id",
        "enabled",
        "disabled_reason",
        "signing_keys",
        "pending",
        "given_up_24h",
        "last_attempt_at",
    ) == [
        (sc.ids["ep-gone"], False, "gone", 1, 0, 2, sc.at(-3600)),
        (sc.ids["ep-ok"], True, None, 2, 1, 0, sc.at(-60)),  # rotating: two live keys
    ]


def check_waiting_estimates_view(sc: Scenario, r: Result) -> None:
    assert r.pick(
        "request_id", "position", "p50_seconds", "p90_seconds", "estimated_at", "events_sent"
    ) == [
        ("w1", 1, 12.5, 40.0, sc.at(-3), 2),
        ("w2", 2, 70.0, None, sc.at(-3), 1),
        ("w3", None, None, None, None, 0),  # waiting, no pass has estimated it yet
    ]
    assert r.pick("waiting_for") == [(s(300),), (s(120),), (s(30),)]


VIEW_CHECKS = {
    "admin_live_sessions": check_live_sessions,
    "admin_sessions_by_avatar": check_by_avatar,
    "admin_duration_distribution": check_distribution,
    "admin_failures_by_error_code": check_failures,
    "admin_end_reasons": check_end_reasons,
    "admin_concurrency": check_concurrency,
    "admin_waiting_queue": check_waiting_queue,
    "admin_stuck": check_stuck,
    "admin_webhook_endpoints": check_webhook_endpoints_view,
    "admin_waiting_estimates": check_waiting_estimates_view,
}


def check_live_counts(_sc: Scenario, r: Result) -> None:
    assert r.rows == [("waiting", 3), ("starting", 2), ("active", 3), ("stopping", 2)]


def check_recent_failures(sc: Scenario, r: Result) -> None:
    assert r.pick("request_id", "error_code", "ended_at") == [
        ("f3", "CAPACITY_TIMEOUT", sc.at(-60)),
        ("f1", "VENDOR_4020", sc.at(-3600)),
        ("f4", "VALIDATION_ERROR", sc.at(-8 * 86400)),
        ("f2", "VENDOR_4020", sc.at(-10 * 86400)),
        ("f5", "START_TIMEOUT", sc.at(-30 * 86400)),
    ]


def check_concurrency_minutes(sc: Scenario, r: Result) -> None:
    assert r.rows == [(m, live, 5) for m, live in expected_concurrency(sc) if live > 0]


def check_peak_by_hour(sc: Scenario, r: Result) -> None:
    peaks: dict[datetime, int] = {}
    for minute, live in expected_concurrency(sc):
        hour = minute.replace(minute=0)
        peaks[hour] = max(peaks.get(hour, 0), live)
    assert r.rows == [(hour, peak, 5) for hour, peak in sorted(peaks.items())]
    assert len(r.rows) in (24, 25)


def check_request_summary(sc: Scenario, r: Result) -> None:
    assert len(r.rows) == 1
    row = r.dicts()[0]
    assert {k: row[k] for k in ("request_id", "status", "vendor_session_id", "ran_for")} == {
        "request_id": "a1",
        "status": "active",
        "vendor_session_id": "v-a1",
        "ran_for": None,
    }
    assert (row["started_at"], row["expires_at"], row["start_attempts"]) == (
        sc.at(-900),
        sc.at(300),
        1,
    )


def check_request_events(sc: Scenario, r: Result) -> None:
    assert r.pick("occurred_at", "kind", "vendor_session_id", "detail") == [
        (sc.at(-1000), "created", None, {"live": 0, "cap": 10}),  # claim_id removed
        (sc.at(-905), "start_attempt", None, {"attempt": 1}),
        (sc.at(-900), "active", "v-a1", {"attempt": 1}),
        (sc.at(-895), "compensated", "v-extra-a1", {"request_id": "a1", "why": "row moved on"}),
    ]


def check_reaper_lag(_sc: Scenario, r: Result) -> None:
    assert r.pick("request_id", "status", "overrun") == [
        ("p1", "stopping", s(450)),
        ("e6", "ended", s(400)),
        ("a3", "active", s(90)),
        ("a2", "active", s(30)),
    ]


def check_orphans_today(sc: Scenario, r: Result) -> None:
    assert r.rows == [
        (sc.now, "v-orphan-today", "ZOMBIE_SESSION_REAP", "stopped", "2026-01-01T00:00:00Z")
    ]


def check_compensations(sc: Scenario, r: Result) -> None:
    assert r.rows == [(sc.at(-895), "a1", "v-extra-a1", "row moved on")]


def check_duplicate_conflicts(sc: Scenario, r: Result) -> None:
    assert r.rows == [
        (
            sc.at(-100),
            "w1",
            "waiting",
            "same request_id with a different payload; the repeat was ignored",
        ),
        (sc.at(-50), "f3", "failed", "bad avatar"),
    ]


def check_stop_failures(sc: Scenario, r: Result) -> None:
    assert r.rows == [
        (sc.at(-400), "p1", "stopping", "v-p1", 1, "503 (1)"),
        (sc.at(-200), "p1", "stopping", "v-p1", 2, "503 (2)"),
        (sc.at(-40), "p1", "stopping", "v-p1", 3, "503 (3)"),
    ]


def check_outbox_backlog(sc: Scenario, r: Result) -> None:
    assert r.rows == [(2, sc.at(-20), s(20))]


def check_accounts(sc: Scenario, r: Result) -> None:
    """The counters, kept by the triggers of migration 0007, equal the scenario's rows."""
    counted = sc.conn.execute(
        text(
            "SELECT count(*) FILTER (WHERE status IN ('starting', 'active', 'stopping')),"
            " count(*) FILTER (WHERE status = 'waiting') FROM sessions"
        )
    ).one()
    by_name = {row["name"]: row for row in r.dicts()}  # other tests' accounts may be there
    assert (by_name["default"]["in_use"], by_name["default"]["waiting"]) == tuple(counted)
    assert all(row["in_use"] == row["waiting"] == 0 for n, row in by_name.items() if n != "default")


def check_webhook_endpoints(sc: Scenario, r: Result) -> None:
    assert r.pick("url", "enabled", "disabled_reason", "failing_since", "pending") == [
        ("https://gone.example.com/in", False, "gone", sc.at(-3600), 0),
        ("https://ok.example.com/in", True, None, sc.at(-60), 1),
    ]


def check_webhook_failures(sc: Scenario, r: Result) -> None:
    assert r.pick("endpoint_id", "event_type", "status", "status_code", "error") == [
        (sc.ids["ep-gone"], "session.active", "given_up", 410, "HTTP 410"),
        (sc.ids["ep-ok"], "session.ended", "pending", 500, "HTTP 500"),
    ]


def check_tenants(sc: Scenario, r: Result) -> None:
    """The tenants' counters (migration 0009's triggers) equal the scenario's rows, all of
    them ``default``'s; a configured tenant with no sessions shows its policy."""
    counted = sc.conn.execute(
        text(
            "SELECT count(*) FILTER (WHERE status IN ('starting', 'active', 'stopping')),"
            " count(*) FILTER (WHERE status = 'waiting'), min(created_at)"
            " FILTER (WHERE status = 'waiting') FROM sessions"
        )
    ).one()
    by_name = {row["tenant"]: row for row in r.dicts()}
    default = by_name["default"]
    assert (default["in_use"], default["waiting"], default["oldest_waiting_at"]) == tuple(counted)
    assert (default["guaranteed"], default["maximum"], default["weight"]) == (0, None, 1)
    assert (by_name["quiet"]["maximum"], by_name["quiet"]["in_use"]) == (3, 0)


QUERY_CHECKS = {
    "live-sessions": check_live_sessions,
    "live-counts": check_live_counts,
    "sessions-by-avatar": check_by_avatar,
    "duration-distribution": check_distribution,
    "failures-by-error-code": check_failures,
    "recent-failures": check_recent_failures,
    "end-reasons": check_end_reasons,
    "concurrency-last-24h": check_concurrency_minutes,
    "concurrency-peak-by-hour": check_peak_by_hour,
    "waiting-queue": check_waiting_queue,
    "stuck": check_stuck,
    "request-summary": check_request_summary,
    "request-events": check_request_events,
    "reaper-lag": check_reaper_lag,
    "orphans-stopped-today": check_orphans_today,
    "compensations": check_compensations,
    "duplicate-conflicts": check_duplicate_conflicts,
    "stop-failures-last-24h": check_stop_failures,
    "outbox-backlog": check_outbox_backlog,
    "accounts": check_accounts,
    "webhook-endpoints": check_webhook_endpoints,
    "webhook-failures-last-24h": check_webhook_failures,
    "tenants": check_tenants,
}


# --- tests ------------------------------------------------------------------------------


def test_every_query_in_the_file_has_a_check() -> None:
    assert list(QUERIES) == list(QUERY_CHECKS)


def test_the_views_exist_and_none_has_a_secret_column(empty: Connection) -> None:
    columns = empty.execute(
        text(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name IN"
            " (SELECT viewname FROM pg_views"
            "  WHERE schemaname = current_schema() AND viewname LIKE 'admin\\_%')"
        )
    ).all()
    assert {t for t, _ in columns} == VIEWS
    assert [(t, c) for t, c in columns if FORBIDDEN_COLUMN.search(c)] == []


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_view_answers(scenario: Scenario, name: str) -> None:
    result = view(scenario.conn, name)
    VIEW_CHECKS[name](scenario, result)
    assert_no_secret(name, result)


@pytest.mark.parametrize("name", list(QUERY_CHECKS))
def test_query_answers(scenario: Scenario, name: str) -> None:
    result = run(scenario.conn, QUERIES[name])
    QUERY_CHECKS[name](scenario, result)
    assert_no_secret(name, result)


def test_request_queries_for_an_unknown_request_return_nothing(scenario: Scenario) -> None:
    for name in ("request-summary", "request-events"):
        assert run(scenario.conn, QUERIES[name], request_id="no-such-request").rows == []


def test_views_on_an_empty_database(empty: Connection) -> None:
    assert view(empty, "admin_waiting_queue").rows == [(0, None, None, None, 0, None, 0)]
    assert view(empty, "admin_duration_distribution").pick("sessions", "percent") == [(0, None)] * 6
    concurrency = view(empty, "admin_concurrency")
    assert len(concurrency.rows) == 24 * 60 + 1
    assert set(concurrency.pick("live_sessions", "vendor_cap")) == {(0, None)}
    always_rows = {"admin_waiting_queue", "admin_duration_distribution", "admin_concurrency"}
    for name in VIEWS - always_rows:
        assert view(empty, name).rows == [], name
    for name, sql in QUERIES.items():
        rows = run(empty, sql).rows  # every query runs on an empty database too
        assert rows == [] or name in {
            "waiting-queue",
            "duration-distribution",
            "concurrency-peak-by-hour",
            "outbox-backlog",
            "accounts",  # the account default is always there
        }, name


def read_only_role_sql(role: str) -> str:
    block = re.search(
        r"<!-- BEGIN read-only role.*?-->\s*```sql\n(.*?)```\s*<!-- END read-only role -->",
        ADMIN_DOC.read_text(),
        flags=re.DOTALL,
    )
    assert block is not None, "docs/admin.md lost its read-only role block"
    return block.group(1).replace("orchestrator_readonly", role)


def test_the_documented_read_only_role_runs_every_query_and_reads_no_secret(
    scenario: Scenario,
) -> None:
    conn = scenario.conn
    role = f"orch_ro_{uuid.uuid4().hex[:8]}"
    # psycopg directly: the block is several statements and has a literal %I
    conn.connection.driver_connection.execute(read_only_role_sql(role))  # rolled back at the end
    conn.execute(text(f'SET LOCAL ROLE "{role}"'))
    for name in VIEWS:
        VIEW_CHECKS[name](scenario, view(conn, name))
    for name, sql in QUERIES.items():
        QUERY_CHECKS[name](scenario, run(conn, sql))
    for forbidden in (
        "SELECT livekit_token FROM sessions",
        "SELECT request_payload FROM sessions",
        "SELECT claim_id FROM sessions",
        "SELECT traceparent FROM sessions",
        "SELECT * FROM sessions",
        "SELECT body FROM event_outbox",
        "SELECT ciphertext FROM webhook_secrets",
        "UPDATE sessions SET status = 'ended'",
        "DELETE FROM session_events",
    ):
        savepoint = conn.begin_nested()
        with pytest.raises(ProgrammingError) as raised:
            conn.execute(text(forbidden))
        assert isinstance(raised.value.orig, psycopg.errors.InsufficientPrivilege), forbidden
        savepoint.rollback()


# --- migration 0002 ---------------------------------------------------------------------


def names(url: str) -> tuple[set[str], set[str]]:
    """(tables, admin views) of the database at ``url``."""
    engine = create_engine(normalize_database_url(url))
    try:
        inspector = inspect(engine)
        tables = set(inspector.get_table_names()) - {"alembic_version"}
        views = {v for v in inspector.get_view_names() if v.startswith("admin_")}
        return tables, views
    finally:
        engine.dispose()


def test_0002_up_down_up_on_a_fresh_postgres() -> None:
    with fresh_postgres_database("orch_admin_views") as url:
        upgrade(url, "0001")
        assert names(url) == (TABLES_0001, set())
        upgrade(url, "0002")
        assert names(url) == (TABLES_0001, VIEWS_0002)
        downgrade(url, "0001")
        assert names(url) == (TABLES_0001, set())
        upgrade(url)
        assert names(url) == (TABLES, VIEWS)
        check(url)  # views are not models: autogenerate sees no difference
        downgrade(url, "base")
        assert names(url) == (set(), set())
