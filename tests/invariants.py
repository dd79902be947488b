"""The service's promises as checks on a whole history, written once for every fault test.

Each check reads from outside the code under test: the database (rows, the outbox, the sweep
leases), the simulator's own record of vendor sessions (``SimulatorServer.sessions()``: when
each was created and ended, by its own clock), events taken from the events exchange, and the
text of log files. Nothing here imports the lifecycle.

Time bounds come from the settings (:class:`Bounds`), with ``slack`` for a loaded 2-core
machine. Vendor times (the simulator's wall clock) and database times are compared directly:
the simulator runs in the test process on the same host as the database.

    world = snapshot(db, sim)
    violations = check_all(world, Bounds.from_settings(settings), Expect(...))
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import text

from orchestrator.config import Settings
from orchestrator.db import Database

LIVE = ("starting", "active", "stopping")
TERMINAL = ("ended", "failed")
RECONCILE_LEASE = "reconcile"
# resolve_stuck_starts fails a `starting` row this long after its lease ran out
# (orchestrator/store/vendor_sync.py LEASE_GRACE_SECONDS); read, not imported, so
# a change there is a change here too, reviewed.
LEASE_GRACE_SECONDS = 5.0


class VendorRecord(Protocol):
    """What the checks need of the simulator: its admin view of every session."""

    def sessions(self, status: str | None = None) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Bounds:
    """How late each promise may be kept, from the settings, plus ``slack``."""

    orphan_grace: float
    reconcile_interval: float
    reconcile_pass: float
    reaper_interval: float
    start_timeout: float
    stop_retry: float
    vendor_timeout: float
    cap: int
    slack: float = 6.0

    @classmethod
    def from_settings(cls, settings: Settings, *, slack: float = 6.0) -> Bounds:
        return cls(
            orphan_grace=settings.orphan_grace_seconds,
            reconcile_interval=settings.reconcile_interval_seconds,
            reconcile_pass=settings.reconcile_pass_seconds,
            reaper_interval=settings.reaper_interval_seconds,
            start_timeout=settings.start_timeout_seconds,
            stop_retry=settings.stop_retry_seconds,
            vendor_timeout=settings.vendor_timeout_seconds,
            cap=settings.max_concurrent_sessions,
            slack=slack,
        )

    @property
    def orphan(self) -> float:
        """A vendor session with no live row is stopped by then: it becomes an orphan after
        the grace, the next pass (one interval, one vendor list and stop call) stops it."""
        return self.orphan_grace + self.reconcile_interval + 2 * self.vendor_timeout + self.slack

    @property
    def reaper(self) -> float:
        """An expired session is stopped by then: the next sweep, one stop call, and a retry
        of the stop after its lease if the first one failed."""
        return self.reaper_interval + self.stop_retry + self.vendor_timeout + self.slack

    @property
    def starting(self) -> float:
        """A `starting` row is settled this long after its lease ran out."""
        return LEASE_GRACE_SECONDS + self.reconcile_interval + self.slack

    @property
    def reconcile_gap(self) -> float:
        """Longest time between two finished reconcile passes."""
        return 2 * self.reconcile_interval + self.reconcile_pass + self.slack


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.detail}"


@dataclass
class World:
    """A snapshot of everything the checks read, taken once the schedule has healed."""

    now: datetime  # the database's clock
    rows: list[dict[str, Any]]
    outbox: list[dict[str, Any]]
    vendor: list[dict[str, Any]]
    reconcile_finished_at: datetime | None
    texts: dict[str, str] = field(default_factory=dict)  # where → text, for secret searches

    def rows_by_request(self) -> dict[str, dict[str, Any]]:
        return {r["request_id"]: r for r in self.rows}


@dataclass
class Expect:
    """What the run did, as its driver recorded it (not read from the code under test)."""

    confirmed: Iterable[str] = ()  # request ids whose publish (or inline call) was confirmed
    dead_lettered: Iterable[str] = ()  # request ids found in the dead-letter queue
    secrets: Iterable[str] = ()  # planted values that must appear nowhere
    live_samples: Iterable[int] = ()  # live-row counts sampled during the run
    events_seen: Iterable[Mapping[str, Any]] | None = None  # bodies taken from the exchange
    require_published: bool = True  # a worker's relay ran: outbox rows must be published
    check_reconcile: bool = True
    # When the service could not keep time (a fault was in force): a time bound counts only
    # the time outside these windows (wall clock, UTC).
    outages: Sequence[tuple[datetime, datetime]] = ()


def deadline(
    start: datetime, bound: float, outages: Sequence[tuple[datetime, datetime]]
) -> datetime:
    """``start`` + ``bound`` seconds of time outside ``outages``."""
    end = start + timedelta(seconds=bound)
    for began, healed in sorted(outages):
        if began <= end and healed > start:
            end += healed - max(began, start)
    return end


# -- reading the world -------------------------------------------------------------------


def _parse(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def snapshot(db: Database, vendor: VendorRecord, texts: Mapping[str, str] = ()) -> World:  # type: ignore[assignment]
    """Read the database and the vendor's record; ``texts`` (log files …) are added as is.
    Every table is dumped into ``texts`` too, for the secret search."""
    with db.engine.connect() as conn:
        now = conn.execute(text("SELECT now()")).scalar_one()
        rows = [dict(r) for r in conn.execute(text("SELECT * FROM sessions")).mappings()]
        outbox = [dict(r) for r in conn.execute(text("SELECT * FROM event_outbox")).mappings()]
        finished = conn.execute(
            text("SELECT finished_at FROM sweep_leases WHERE name = :n"), {"n": RECONCILE_LEASE}
        ).scalar_one_or_none()
        dumps = {}
        for table in ("sessions", "session_events", "event_outbox", "early_stops"):
            found = [dict(r) for r in conn.execute(text(f"SELECT * FROM {table}")).mappings()]
            for r in found:
                # By design a request not yet started keeps its whole body (the vendor call
                # needs it); it is stripped when the row leaves `waiting`/`starting`.
                if table == "sessions" and r["status"] in ("waiting", "starting"):
                    r.pop("request_payload")
            for column in found[0] if found else ():
                values = (json.dumps(r.get(column), default=str) for r in found)
                dumps[f"table {table}.{column}"] = "\n".join(values)
    all_texts = dict(dumps)
    all_texts.update(dict(texts))
    return World(now, rows, outbox, vendor.sessions(), finished, all_texts)


def live_row_count(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM sessions"
                    " WHERE status IN ('starting', 'active', 'stopping')"
                )
            ).scalar_one()
        )


# -- the invariants ----------------------------------------------------------------------


def one_row_or_dead_letter(world: World, expect: Expect) -> list[Violation]:
    """Every confirmed start has exactly one row, or a dead letter saying why."""
    by_request = defaultdict(int)
    for r in world.rows:
        by_request[r["request_id"]] += 1
    dead = set(expect.dead_lettered)
    out = []
    for rid in expect.confirmed:
        count = by_request.get(rid, 0)
        if count == 0 and rid not in dead:
            what = f"confirmed start {rid!r} has no row and no dead letter"
            out.append(Violation("one-row", what))
        elif count > 1:
            out.append(Violation("one-row", f"start {rid!r} has {count} rows"))
    return out


def rows_settled(
    world: World, bounds: Bounds, outages: Sequence[tuple[datetime, datetime]] = ()
) -> list[Violation]:
    """Every row is terminal (and explained), or live within its own deadline."""
    out = []
    now = world.now

    def past(start: datetime | None, bound: float) -> bool:
        return start is not None and deadline(start, bound, outages) < now

    for r in world.rows:
        rid, status = r["request_id"], r["status"]
        if status == "failed" and not (r["error_code"] and r["error_message"]):
            out.append(Violation("settled", f"{rid!r} failed without error code and message"))
        elif status == "ended" and not r["end_reason"]:
            out.append(Violation("settled", f"{rid!r} ended without an end reason"))
        elif status == "active":
            expires = r["expires_at"]
            if expires is None or past(expires, bounds.reaper):
                out.append(Violation("settled", f"{rid!r} active past expires_at {expires}"))
            credentials = ("vendor_session_id", "livekit_url", "livekit_room", "livekit_token")
            if not all(r[name] for name in credentials):
                missing = [name for name in credentials if not r[name]]
                out.append(Violation("settled", f"{rid!r} active without {', '.join(missing)}"))
        elif status == "waiting":
            ends = r["start_deadline_at"]
            if past(ends, bounds.reaper):
                out.append(Violation("settled", f"{rid!r} waiting past its deadline {ends}"))
        elif status == "starting":
            lease = r["attempt_lease_until"] or (
                (r["admitted_at"] or r["created_at"]) + timedelta(seconds=bounds.start_timeout)
            )
            if past(lease, bounds.starting):
                out.append(Violation("settled", f"{rid!r} starting past its lease {lease}"))
        elif status == "stopping":
            retry = r["stop_retry_at"] or r["stop_requested_at"] or now
            if past(retry, bounds.reaper + bounds.slack):
                out.append(Violation("settled", f"{rid!r} stopping since {retry}"))
    return out


def terminal_events_published(world: World, expect: Expect) -> list[Violation]:
    """Every terminal row's event is in the outbox (and published, when a relay ran; and
    seen on the exchange, when the run listened to it)."""
    queued: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for o in world.outbox:
        body = o["body"] or {}
        queued[str(body.get("request_id")), str(body.get("status"))].append(o)
    seen = None
    if expect.events_seen is not None:
        seen = {(str(b.get("request_id")), str(b.get("status"))) for b in expect.events_seen}
    out = []
    for r in world.rows:
        if r["status"] not in TERMINAL:
            continue
        key = (r["request_id"], r["status"])
        entries = queued.get(key, [])
        if not entries:
            out.append(Violation("events", f"{key[0]!r} is {key[1]} but no event was queued"))
        elif expect.require_published and not any(e["published_at"] for e in entries):
            out.append(Violation("events", f"{key[0]!r} {key[1]}: event never published"))
        elif seen is not None and key not in seen:
            out.append(Violation("events", f"{key[0]!r} {key[1]}: event not on the exchange"))
    return out


def _vendor_times(s: Mapping[str, Any], now: datetime) -> tuple[datetime, datetime]:
    created = _parse(s["created_at"])
    ended = _parse(s["ended_at"]) or now
    assert created is not None
    return created, ended


def _over(
    start: datetime, end: datetime, bound: float, outages: Sequence[tuple[datetime, datetime]]
) -> float:
    """Seconds ``end`` is past ``start`` + ``bound`` (outages not counted); <= 0: in time."""
    return (end - deadline(start, bound, outages)).total_seconds()


def vendor_sessions_end_on_time(
    world: World, bounds: Bounds, outages: Sequence[tuple[datetime, datetime]] = ()
) -> list[Violation]:
    """No vendor session lives past its row's ``expires_at`` plus the reaper's bound, nor
    without a live row once the orphan grace and one reconcile interval have passed."""
    owner = {r["vendor_session_id"]: r for r in world.rows if r["vendor_session_id"]}
    out = []
    for s in world.vendor:
        created, ended = _vendor_times(s, world.now)
        row = owner.get(s["session_id"])
        if row is None:
            life = (ended - created).total_seconds()
            if _over(created, ended, bounds.orphan, outages) > 0:
                out.append(
                    Violation(
                        "orphan",
                        f"vendor session {s['session_id']} (avatar {s['avatar_id']!r}) had no row"
                        f" for {life:.1f} s > {bounds.orphan:.1f} s"
                        f"{' and still runs' if s['status'] == 'active' else ''}",
                    )
                )
            continue
        if row["expires_at"] is not None:
            over = (ended - row["expires_at"]).total_seconds()
            if _over(row["expires_at"], ended, bounds.reaper, outages) > 0:
                out.append(
                    Violation(
                        "expiry",
                        f"vendor session of {row['request_id']!r} ran {over:.1f} s past its"
                        f" expires_at (bound {bounds.reaper:.1f} s)",
                    )
                )
        if row["status"] in TERMINAL and row["ended_at"] is not None:
            since = max(row["ended_at"], created)
            over = (ended - since).total_seconds()
            if _over(since, ended, bounds.orphan, outages) > 0:
                out.append(
                    Violation(
                        "orphan",
                        f"vendor session of {row['request_id']!r} ran {over:.1f} s after its row"
                        f" became {row['status']}",
                    )
                )
    return out


def at_most_one_vendor_session(
    world: World, bounds: Bounds, outages: Sequence[tuple[datetime, datetime]] = ()
) -> list[Violation]:
    """Requests are told apart at the vendor by their avatar id (the drivers give each request
    its own). An extra session is allowed only as a documented crash duplicate: never
    recorded, and stopped within the orphan bound."""
    recorded = {r["vendor_session_id"] for r in world.rows if r["vendor_session_id"]}
    by_avatar: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for s in world.vendor:
        by_avatar[s["avatar_id"]].append(s)
    out = []
    for avatar, sessions in by_avatar.items():
        mine = [s for s in sessions if s["session_id"] in recorded]
        if len(mine) > 1:
            what = f"avatar {avatar!r}: {len(mine)} recorded sessions"
            out.append(Violation("one-session", what))
        for s in sessions:
            if s["session_id"] in recorded:
                continue
            created, ended = _vendor_times(s, world.now)
            if _over(created, ended, bounds.orphan, outages) > 0:
                what = f"avatar {avatar!r}: an extra session outlived the bound"
                out.append(Violation("one-session", what))
    return out


def duplicates(world: World) -> int:
    """Vendor sessions beyond the first per avatar (documented crash duplicates included)."""
    by_avatar: dict[str, int] = defaultdict(int)
    for s in world.vendor:
        by_avatar[s["avatar_id"]] += 1
    return sum(n - 1 for n in by_avatar.values() if n > 1)


def cap_respected(world: World, bounds: Bounds, expect: Expect) -> list[Violation]:
    """Live rows never exceed the cap (sampled during the run, and now)."""
    live_now = sum(1 for r in world.rows if r["status"] in LIVE)
    worst = max([live_now, *expect.live_samples])
    if worst > bounds.cap:
        return [Violation("cap", f"{worst} live rows > cap {bounds.cap}")]
    return []


def secrets_nowhere(world: World, expect: Expect) -> list[Violation]:
    out = []
    for secret in expect.secrets:
        if not secret:
            continue
        for where, content in world.texts.items():
            if secret in content:
                out.append(Violation("secret", f"a planted secret ({secret[:4]}…) is in {where}"))
    return out


def reconcile_keeps_completing(
    world: World, bounds: Bounds, outages: Sequence[tuple[datetime, datetime]] = ()
) -> list[Violation]:
    finished = world.reconcile_finished_at
    if finished is None:
        return [Violation("reconcile", "no reconcile pass ever finished")]
    gap = (world.now - finished).total_seconds()
    if _over(finished, world.now, bounds.reconcile_gap, outages) > 0:
        return [Violation("reconcile", f"last pass finished {gap:.1f} s ago")]
    return []


CHECKS: Sequence[str] = (
    "one-row",
    "settled",
    "events",
    "expiry",
    "orphan",
    "one-session",
    "cap",
    "secret",
    "reconcile",
)


def check_all(world: World, bounds: Bounds, expect: Expect) -> list[Violation]:
    """Every invariant; the violations found (empty: the history keeps every promise)."""
    outages = list(expect.outages)
    found = [
        *one_row_or_dead_letter(world, expect),
        *rows_settled(world, bounds, outages),
        *terminal_events_published(world, expect),
        *vendor_sessions_end_on_time(world, bounds, outages),
        *at_most_one_vendor_session(world, bounds, outages),
        *cap_respected(world, bounds, expect),
        *secrets_nowhere(world, expect),
    ]
    if expect.check_reconcile:
        found += reconcile_keeps_completing(world, bounds, outages)
    return found
