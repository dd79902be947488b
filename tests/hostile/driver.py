"""One hostile-vendor scenario, in process: the real client, start path, reconciler and
reaper against the run's Postgres and the simulator, the vendor's replies changed at the HTTP
boundary by a generated plan; then the vendor heals, the service gets its passes, and the
invariants are checked.

The scenario, with the vendor honest: request A is ``active``; B is ``active`` but the vendor
ended it (its row is older than the reconciler's list race margin); C is ``active`` and
expired; O is a vendor session no row knows (an orphan, grace 0). Then with the plan in force:
start D (it asks for 1 minute and carries a planted LLM key), one reconcile pass, one reaper
sweep. Healed: D's message redelivered while it asks to run again, admission, two rounds of
reconcile and reap.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import text

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.deepbrain import DeepBrainClient
from orchestrator.deepbrain import deadline as request_deadline
from orchestrator.lifecycle import DispatchAfterCommit, Lifecycle, RetryLater, handle_start_message
from orchestrator.lifecycle.inline import InlineDispatcher
from orchestrator.lifecycle.reaper import reap
from orchestrator.lifecycle.reconciler import reconcile
from orchestrator.simulator import SimulatorServer
from tests import invariants as inv
from tests.hostile.vendor import HostileTransport, Mutation

PLANTED_LLM_KEY = "planted-llm-key-5e1f0c9a"
ASKED_MINUTES = 1
REDELIVERIES = 3
# Over a time bound by more than this is a violation: the deadline cuts a read at the bound
# (plus a scheduling delay); a reply trickled past it would take many times the bound.
TIME_SLACK_SECONDS = 1.0


def request_d() -> dict[str, Any]:
    return {
        "request_id": "hostile-d",
        "avatar_id": "avatar-d",
        "max_session_duration": ASKED_MINUTES,
        "avatar_persona": {
            "llm_configurations": {
                "provider": "custom",
                "custom_http": {
                    "endpoint": "https://llm.invalid/v1/chat",
                    "headers": {"Authorization": f"Bearer {PLANTED_LLM_KEY}"},
                },
            }
        },
    }


@dataclass
class Outcome:
    """What one scenario found; ``signature`` names each violation's class for grouping."""

    violations: list[inv.Violation] = field(default_factory=list)
    served: list[tuple[str, Mutation]] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    start_seconds: float = 0.0  # how long the start of D took under the plan
    timings: list[tuple[str, float]] = field(default_factory=list)  # (endpoint, seconds)

    def add(self, name: str, detail: str) -> None:
        self.violations.append(inv.Violation(name, detail))


class _Capture(logging.Handler):
    """Every log line of the run, formatted with its traceback, for the secret search."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if record.exc_info:
            line += "\n" + "".join(traceback.format_exception(*record.exc_info))
        self.lines.append(line)


@contextmanager
def _captured_logs() -> Iterator[_Capture]:
    handler = _Capture()
    root = logging.getLogger()
    before = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(before)


def crash_signature(stage: str, error: BaseException) -> str:
    """``stage:Type@file:function`` of the innermost frame in our own code."""
    where = "?"
    for frame in traceback.extract_tb(error.__traceback__):
        if "/tests/" in frame.filename:  # the harness's own bug: never counted as known
            where = f"HARNESS {frame.filename.rsplit('/tests/', 1)[1]}:{frame.name}"
        elif "/orchestrator/" in frame.filename and not frame.filename.endswith("db/engine.py"):
            where = f"{frame.filename.rsplit('/orchestrator/', 1)[1]}:{frame.name}"
    return f"{stage}:{type(error).__name__}@{where}"


def _reset(db: Database, sim: SimulatorServer) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE sessions, session_events, event_outbox, early_stops, sweep_leases"
                " RESTART IDENTITY CASCADE"
            )
        )
    sim.reset(restore_config=True)
    sim.configure(max_concurrent_sessions=100, idle_timeout_seconds=None)


def _lifecycle(settings: Settings, transport: HostileTransport, waits: list[float]) -> Lifecycle:
    app_id, user_key = settings.vendor_credentials()

    def sleep(seconds: float) -> None:  # retry waits are recorded, not slept (CI time)
        waits.append(seconds)

    dispatcher = InlineDispatcher()
    lc = Lifecycle(
        settings=settings,
        db=Database(
            settings.effective_database_url, pool_size=4, hooks=DispatchAfterCommit(dispatcher)
        ),
        vendor=DeepBrainClient(
            settings.deepbrain_base_url,
            app_id,
            user_key,
            timeout_seconds=settings.vendor_timeout_seconds,
            transport=transport,
            sleep=sleep,
        ),
        dispatcher=dispatcher,
    )
    dispatcher.lifecycle = lc
    return lc


def _start(lc: Lifecycle, kwargs: dict[str, Any], out: Outcome, stage: str) -> RetryLater | None:
    try:
        handle_start_message(lc, (), kwargs, claim_id=f"claim-{kwargs['request_id']}")
    except RetryLater as later:
        return later
    except Exception as error:
        out.add("start-ends-known", crash_signature(stage, error))
    return None


def _sweep(lc: Lifecycle, out: Outcome, stage: str) -> None:
    try:
        report = reconcile(lc)
        if report.skipped_pass:
            out.add("reconcile-completes", f"{stage}: pass skipped, the lease was not released")
    except Exception as error:
        out.add("reconcile-completes", crash_signature(f"{stage}.reconcile", error))
    try:
        reap(lc)
    except Exception as error:
        out.add("reaper-completes", crash_signature(f"{stage}.reap", error))


def _setup(lc: Lifecycle, sim: SimulatorServer) -> None:
    for name in ("a", "b", "c"):
        handle_start_message(
            lc, (), {"request_id": f"req-{name}", "avatar_id": f"avatar-{name}"}, claim_id=name
        )
    lc.vendor.start_session({"avatar_id": "avatar-orphan"})
    with lc.db.engine.begin() as conn:
        vendor_b = conn.execute(
            text("SELECT vendor_session_id FROM sessions WHERE request_id = 'req-b'")
        ).scalar_one()
        conn.execute(
            text(
                "UPDATE sessions SET started_at = now() - interval '1 minute'"
                " WHERE request_id = 'req-b'"
            )
        )
        conn.execute(
            text(
                "UPDATE sessions SET expires_at = now() - interval '1 second'"
                " WHERE request_id = 'req-c'"
            )
        )
    sim.end_session(vendor_b, "USER_CLOSED")


def _heal(
    lc: Lifecycle, transport: HostileTransport, later: RetryLater | None, out: Outcome
) -> None:
    transport.heal()
    kwargs = request_d()
    for _ in range(REDELIVERIES):
        if later is None:
            break
        try:
            handle_start_message(
                lc,
                (),
                kwargs,
                claim_id="claim-hostile-d",
                abandoned_attempt=later.abandoned_attempt,
            )
            later = None
        except RetryLater as again:
            later = again
        except Exception as error:
            out.add("start-ends-known", crash_signature("healed.start", error))
            later = None
    # Time passes: stops that failed under the hostile vendor are due again.
    with lc.db.engine.begin() as conn:
        conn.execute(text("UPDATE sessions SET stop_retry_at = now() WHERE status = 'stopping'"))
    try:
        lc.dispatcher.admit_waiting()
    except Exception as error:
        out.add("admission-completes", crash_signature("healed.admit", error))
    for round_ in range(2):
        _sweep(lc, out, f"healed{round_}")
    after = _start(lc, {"request_id": "req-e", "avatar_id": "avatar-e"}, out, "healed.start")
    if after is not None:
        out.add("start-ends-known", "healed.start:RetryLater@an honest vendor's start")


def healed_violations(world: inv.World, bounds: inv.Bounds) -> list[inv.Violation]:
    """The invariants once the vendor is honest again and the service had its passes: time
    bounds are not waited for in process, so what must have been stopped must not run."""
    live_rows = {r["vendor_session_id"]: r for r in world.rows if r["status"] in inv.LIVE}
    out = []
    for s in world.vendor:
        if s["status"] != "active":
            continue
        row = live_rows.get(s["session_id"])
        if row is None:
            what = f"vendor session of {s['avatar_id']!r} runs, no live row"
            out.append(inv.Violation("orphan", what))
        elif row["expires_at"] is not None and row["expires_at"] <= world.now:
            out.append(inv.Violation("expiry", f"{row['request_id']!r} runs past expires_at"))
    out += inv.rows_settled(world, bounds)
    return out


def expiry_within_ask(world: inv.World, default_minutes: int) -> list[inv.Violation]:
    """A session ends at the earliest of what was asked (or the default) and the grant."""
    out = []
    for r in world.rows:
        if r["expires_at"] is None or r["start_sent_at"] is None:
            continue
        asked = (r["request_payload"] or {}).get("max_session_duration") or default_minutes
        limit = r["start_sent_at"] + timedelta(minutes=asked, seconds=1)
        if r["max_duration_seconds"] is not None:
            cut = timedelta(seconds=r["max_duration_seconds"] + 1)
            limit = min(limit, r["start_sent_at"] + cut)
        if r["expires_at"] > limit:
            out.append(
                inv.Violation(
                    "expiry-ask",
                    f"{r['request_id']!r} asked {asked} min, expires at"
                    f" {(r['expires_at'] - r['start_sent_at']).total_seconds():.0f} s",
                )
            )
    return out


def time_bounds(
    settings: Settings, timings: Sequence[tuple[str, float]], start_seconds: float
) -> list[inv.Violation]:
    """Every vendor request ends within ``VENDOR_TIMEOUT_SECONDS`` (its body read included),
    the start of D within its attempt lease (``START_TIMEOUT_SECONDS``)."""
    out = [
        inv.Violation(
            "request-bound",
            f"a {endpoint} request took {took:.1f} s > {settings.vendor_timeout_seconds} s",
        )
        for endpoint, took in timings
        if took > settings.vendor_timeout_seconds + TIME_SLACK_SECONDS
    ]
    if start_seconds > settings.start_timeout_seconds + TIME_SLACK_SECONDS:
        lease = settings.start_timeout_seconds
        what = f"the start took {start_seconds:.1f} s > its lease {lease} s"
        out.append(inv.Violation("start-bound", what))
    return out


def run_scenario(
    settings: Settings,
    db: Database,
    sim: SimulatorServer,
    plan: Mapping[str, Sequence[Mutation]],
    secrets: Sequence[str],
    lasting: Mapping[str, Mutation] | None = None,
) -> Outcome:
    out = Outcome()
    _reset(db, sim)
    inner = request_deadline.install(httpx.HTTPTransport())
    transport = HostileTransport(inner, push_fault=sim.push_fault)
    lc = _lifecycle(settings, transport, out.waits)
    try:
        with _captured_logs() as logs:
            _setup(lc, sim)
            transport.script(plan)
            transport.lasting = lasting or {}
            began = time.monotonic()
            later = _start(lc, request_d(), out, "hostile.start")
            out.start_seconds = time.monotonic() - began
            _sweep(lc, out, "hostile")
            _heal(lc, transport, later, out)
        out.served = list(transport.served)
        out.timings = list(transport.timings)
        bounds = inv.Bounds.from_settings(settings, slack=0.0)
        zero = inv.Bounds(0, 0, 0, 0, 0, 0, 0, bounds.cap, 0)
        world = inv.snapshot(db, sim, {"log": "\n".join(logs.lines)})
        expect = inv.Expect(
            confirmed=["req-a", "req-b", "req-c", "hostile-d", "req-e"],
            secrets=secrets,
            require_published=False,
        )
        out.violations += healed_violations(world, zero)
        e = world.rows_by_request().get("req-e")
        if e is not None and e["status"] not in ("active", "waiting"):
            what = f"{e['status']}:{e['error_code']}: {e['error_message']}"
            out.add("serves-after-heal", what[:300])
        out.violations += inv.one_row_or_dead_letter(world, expect)
        out.violations += inv.terminal_events_published(world, expect)
        out.violations += inv.cap_respected(world, bounds, expect)
        out.violations += inv.secrets_nowhere(world, expect)
        out.violations += expiry_within_ask(world, settings.max_session_minutes)
        wait_bound = max(settings.reconcile_pass_seconds, settings.start_timeout_seconds)
        out.violations += [
            inv.Violation("bounded-wait", f"a retry waited {w!r} s > {wait_bound} s")
            for w in out.waits
            if not w <= wait_bound
        ]
        out.violations += time_bounds(settings, transport.timings, out.start_seconds)
    finally:
        lc.close()
    return out
