"""``orchestrator demo``: the whole lifecycle on embedded defaults, in well under a minute.

No database or broker server to install, no vendor account, no network: the embedded
PostgreSQL (started here, joined by the worker) and kombu's SQLite transport in a temporary
folder, the built-in DeepBrain simulator on localhost, and a real Celery worker process (with
beat inside, so the reaper runs).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from sqlalchemy import func, select

from orchestrator.config import Settings, load_settings
from orchestrator.db import Database, OutboxEvent, embedded
from orchestrator.db.migrate import upgrade
from orchestrator.producer import Producer, SessionInfo, SessionNotFound
from orchestrator.reporting import format_table, session_table, utc_clock, utc_iso
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.telemetry import TRACE_FILE_VARIABLE, setup_telemetry, shutdown_telemetry
from orchestrator.trace_view import find_trace, read_span_files, render_trace

DEMO_APP_ID = "demo-app-id"
DEMO_USER_KEY = "demo-user-key"
TIME_LIMIT_SECONDS = 50.0
DEMO_CAP = 3


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(
        ORCHESTRATOR_STATE_DIR=str(settings.state_dir),
        ORCHESTRATOR_DEEPBRAIN_BASE_URL=settings.deepbrain_base_url,
        ORCHESTRATOR_DEEPBRAIN_APP_ID=DEMO_APP_ID,
        ORCHESTRATOR_DEEPBRAIN_USER_KEY=DEMO_USER_KEY,
        ORCHESTRATOR_REAPER_INTERVAL_SECONDS=str(settings.reaper_interval_seconds),
        ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS=str(settings.reconcile_interval_seconds),
        ORCHESTRATOR_LOG_LEVEL="INFO",
        ORCHESTRATOR_LOG_FORMAT="text",  # worker.log is read by a person when the demo fails
        ORCHESTRATOR_MAX_CONCURRENT_SESSIONS=str(settings.max_concurrent_sessions),
        ORCHESTRATOR_TRACE_FILE=str(settings.state_dir / "spans-worker.jsonl"),
    )
    return env


@contextmanager
def _worker(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "orchestrator.cli", "worker", "--beat", "--concurrency", "8"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            command, env=_env(settings), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _say(message: str, **style: Any) -> None:
    click.secho(f"{utc_clock(datetime.now(UTC))}  {message}", **style)


def _describe(info: SessionInfo) -> str:
    if info.status == "active":
        assert info.expires_at is not None
        left = info.expires_at.timestamp() - time.time()
        return f"active in room {info.livekit_room}, expires in {left:.0f} s"
    if info.status == "waiting":
        return f"waiting: all {DEMO_CAP} slots busy"
    if info.status == "ended":
        return f"ended: {info.end_reason}"
    if info.status == "failed":
        return f"failed: {info.error_code} {info.error_message}"
    return info.status


def run_demo(count: int) -> int:
    started = time.monotonic()
    state_dir = Path(tempfile.mkdtemp(prefix="orchestrator-demo-"))
    click.secho("session-orchestrator demo", bold=True)
    click.echo(f"state (embedded PostgreSQL and broker, worker log): {state_dir}")
    os.environ[TRACE_FILE_VARIABLE] = str(state_dir / "spans-demo.jsonl")
    setup_telemetry()
    with SimulatorServer(
        SimulatorConfig(app_id=DEMO_APP_ID, user_key=DEMO_USER_KEY, max_concurrent_sessions=count)
    ) as sim:
        # The embedded database and broker, here as in the worker (whose environment _env makes).
        settings = load_settings(
            state_dir=state_dir,
            database_url="",
            broker_url="",
            deepbrain_base_url=sim.base_url,
            deepbrain_app_id=DEMO_APP_ID,
            deepbrain_user_key=DEMO_USER_KEY,
            reaper_interval_seconds=1.0,
            reconcile_interval_seconds=5.0,
            max_concurrent_sessions=DEMO_CAP,
        )
        _say(f"DeepBrain simulator on {sim.base_url}")
        try:
            code = _run(settings, sim, count, started)
        finally:
            embedded.stop(state_dir)
    click.echo()
    _show_trace(state_dir, "demo-1")
    click.echo()
    elapsed = time.monotonic() - started
    if code == 0:
        shutil.rmtree(state_dir / "postgres", ignore_errors=True)  # ~40 MB, shown above
        _say(f"demo finished in {elapsed:.1f} s: every session ended on time", fg="green")
    else:
        _say(f"demo FAILED after {elapsed:.1f} s; see {state_dir / 'worker.log'}", fg="red")
    return code


def _run(settings: Settings, sim: SimulatorServer, count: int, started: float) -> int:
    """Migrate, run the scenario with a worker, print the tables; the exit code."""
    database_started = time.monotonic()
    upgrade(settings.effective_database_url)
    _say(
        f"embedded PostgreSQL started and migrated in {time.monotonic() - database_started:.1f} s"
        f" (data in {settings.state_dir / 'postgres'})"
    )
    with _worker(settings, settings.state_dir / "worker.log"):
        _say(
            f"worker started (threads pool, beat inside: reaper every 1 s);"
            f" at most {DEMO_CAP} sessions at once"
        )
        producer = Producer(settings)
        try:
            code = _scenario(producer, sim, count, started)
        finally:
            producer.close()
    database = Database(settings.effective_database_url, pool_size=1)
    click.echo()
    click.secho("All sessions (from the sessions table; tokens are never shown):", bold=True)
    click.echo(session_table(database, live_only=False))
    click.echo()
    click.secho("Lifecycle events published (outbox → exchange orchestrator.events):", bold=True)
    click.echo(_event_counts(database))
    database.dispose()
    click.echo()
    click.secho("What the vendor (simulator) saw:", bold=True)
    rows = [
        (s["session_id"][:14], s["status"], str(s["end_reason"]), str(s["stop_calls"]))
        for s in sim.sessions()
    ]
    click.echo(format_table(("vendor session", "status", "end reason", "stop calls"), rows))
    return code


def _scenario(producer: Producer, sim: SimulatorServer, count: int, started: float) -> int:
    durations = [6 + 2 * i for i in range(count - 1)]
    request_ids = [
        producer.enqueue_start_session(
            avatar_id=f"avatar-{i + 1}", max_duration_seconds=seconds, request_id=f"demo-{i + 1}"
        )
        for i, seconds in enumerate(durations)
    ]
    stop_me = producer.enqueue_start_session(
        avatar_id="avatar-stop", max_duration_seconds=60, request_id="demo-stopped-by-user"
    )
    request_ids.append(stop_me)
    _say(f"enqueued {count} start jobs: {', '.join(request_ids)}")

    seen: dict[str, str] = {}
    shown_credentials = stop_sent = False
    while time.monotonic() - started < TIME_LIMIT_SECONDS:
        for rid in request_ids:
            try:
                info = producer.session_info(rid)
            except SessionNotFound:
                continue
            text = _describe(info)
            if seen.get(rid, "").split(" ")[0] != text.split(" ")[0]:
                seen[rid] = text
                _say(f"{rid:<22} {text}")
                if info.status == "active" and not shown_credentials:
                    shown_credentials = True
                    _show_credentials(info)
            if rid == stop_me and info.status == "active" and not stop_sent:
                stop_sent = True
                producer.request_stop(request_id=rid)
                _say(f"{rid:<22} stop requested by the user (USER_CLOSED)")
        if all(seen.get(rid, "").startswith(("ended", "failed")) for rid in request_ids):
            break
        time.sleep(0.2)
    return _verdict(producer, request_ids, stop_me)


def _event_counts(database: Database) -> str:
    with database.transaction() as session:
        counts = session.execute(
            select(OutboxEvent.routing_key, func.count(), func.count(OutboxEvent.published_at))
            .group_by(OutboxEvent.routing_key)
            .order_by(OutboxEvent.routing_key)
        ).all()
    rows = [(key, str(total), str(published)) for key, total, published in counts]
    return format_table(("routing key", "events", "published"), rows)


def _show_trace(state_dir: Path, request_id: str) -> None:
    shutdown_telemetry()
    spans = read_span_files(sorted(state_dir.glob("spans-*.jsonl")))
    trace_id = find_trace(spans, request_id)
    click.secho(
        f"One trace per session: {request_id}, from enqueue to the reaper's stop"
        " (OpenTelemetry; SQL folded):",
        bold=True,
    )
    click.echo(render_trace(spans, trace_id) if trace_id else "no spans recorded")


def _show_credentials(info: SessionInfo) -> None:
    token = info.livekit_token or ""
    click.echo(f"           LiveKit url:   {info.livekit_url}")
    click.echo(f"           room:          {info.livekit_room}")
    click.echo(f"           token:         {token[:16]}… ({len(token)} chars, a real LiveKit JWT)")
    click.echo(f"           token expires: {utc_iso(info.livekit_token_expires_at)}")
    click.echo(f"           session ends:  {utc_iso(info.expires_at)}")


def _verdict(producer: Producer, request_ids: list[str], stop_me: str) -> int:
    problems = []
    for rid in request_ids:
        info = producer.session_info(rid)
        expected = "USER_CLOSED" if rid == stop_me else "MAX_DURATION_REACHED"
        if info.status != "ended" or info.end_reason != expected:
            problems.append(f"{rid}: {info.status} {info.end_reason or info.error_code}")
    for problem in problems:
        click.secho(f"unexpected: {problem}", fg="red")
    return 1 if problems else 0
