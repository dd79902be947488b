"""The producer's commands: ``orchestrator enqueue``, ``stop``, ``status``, ``sessions``
(added to the group of :mod:`orchestrator.cli`)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from orchestrator.cli_support import EXIT_SESSION_FAILED, cli_settings, cli_telemetry


def _stop_reason(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """The worker's rule, checked before anything is sent."""
    from orchestrator.contract import is_valid_stop_reason

    if not is_valid_stop_reason(value):
        raise click.BadParameter("upper-case letters, digits and _ (e.g. USER_CLOSED)")
    return value


@click.command()
@click.option("--avatar-id", required=True)
@click.option("--request-id")
@click.option("--max-session-duration", type=int, help="Minutes (sent to the vendor).")
@click.option("--max-duration-seconds", type=int, help="Orchestrator cap in seconds.")
@click.option("--start-deadline-seconds", type=int)
@click.option("--greeting-text")
@click.option("--persona", help="avatar_persona as JSON.")
@click.option("--metadata", help="metadata as JSON.")
@click.option(
    "--wait",
    "wait_seconds",
    type=float,
    help=f"Wait up to N s and print the result; exit {EXIT_SESSION_FAILED} if it failed.",
)
@click.option(
    "--wait-via",
    type=click.Choice(["database", "events"]),
    default="database",
    show_default=True,
    help="Where --wait learns the outcome: the sessions table, or the orchestrator.events"
    " exchange (needs only the broker).",
)
def enqueue(
    avatar_id: str,
    request_id: str | None,
    max_session_duration: int | None,
    max_duration_seconds: int | None,
    start_deadline_seconds: int | None,
    greeting_text: str | None,
    persona: str | None,
    metadata: str | None,
    wait_seconds: float | None,
    wait_via: str,
) -> None:
    """Publish a start job; prints its request_id."""
    from orchestrator.contract import InvalidStartRequest
    from orchestrator.producer import Producer, SessionEvents

    kwargs: dict[str, Any] = {"avatar_id": avatar_id}
    optional = {
        "request_id": request_id,
        "max_session_duration": max_session_duration,
        "max_duration_seconds": max_duration_seconds,
        "start_deadline_seconds": start_deadline_seconds,
        "greeting_text": greeting_text,
        "avatar_persona": _json_option("--persona", persona),
        "metadata": _json_option("--metadata", metadata),
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    cli_telemetry()
    settings = cli_settings()
    producer = Producer(settings)
    # Listening before publishing: the outcome cannot come before the queue exists.
    events = SessionEvents(settings).start() if wait_seconds and wait_via == "events" else None
    try:
        rid = producer.enqueue_start_session(**kwargs)
        click.echo(rid)
        if events is not None:
            _print_info(events.wait(rid, wait_seconds or 0))
        elif wait_seconds:
            _print_info(producer.wait_for_session(rid, wait_seconds))
    except (InvalidStartRequest, TimeoutError) as error:
        raise click.ClickException(str(error)) from None
    finally:
        producer.close()
        if events is not None:
            events.close()


def _json_option(name: str, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not JSON: {error}", param_hint=name) from None


@click.command()
@click.option("--request-id")
@click.option("--session-id", help="The vendor's session id.")
@click.option("--reason", default="USER_CLOSED", show_default=True, callback=_stop_reason)
def stop(request_id: str | None, session_id: str | None, reason: str) -> None:
    """Ask for a session to be stopped."""
    from orchestrator.producer import Producer

    if (request_id is None) == (session_id is None):
        raise click.UsageError("give exactly one of --request-id or --session-id")
    producer = Producer(cli_settings())
    try:
        producer.request_stop(request_id=request_id, session_id=session_id, reason=reason)
    finally:
        producer.close()
    click.echo("stop requested")


def _print_info(info: Any) -> None:
    """The request as JSON (times in UTC); exit 3 if it failed."""
    from orchestrator.reporting import utc_iso

    fields = {
        "request_id": info.request_id,
        "status": info.status,
        "session_id": info.session_id,
        "livekit_url": info.livekit_url,
        "livekit_room": info.livekit_room,
        "livekit_token": info.livekit_token,
        "livekit_token_expires_at": utc_iso(info.livekit_token_expires_at),
        "expires_at": utc_iso(info.expires_at),
        "end_reason": info.end_reason,
        "error_code": info.error_code,
        "error_message": info.error_message,
        "position": info.position,
        "wait_p50_seconds": info.wait_p50_seconds,
        "wait_p90_seconds": info.wait_p90_seconds,
        "estimated_at": utc_iso(info.estimated_at),
    }
    click.echo(json.dumps({k: v for k, v in fields.items() if v is not None}, indent=2))
    if info.status == "failed":
        sys.exit(EXIT_SESSION_FAILED)


@click.command()
@click.argument("request_id")
def status(request_id: str) -> None:
    """Print one request's state (JSON), including its LiveKit credentials while active and
    its position and expected wait (p50, p90 in seconds) while waiting; exit 3 if the
    request failed."""
    from orchestrator.producer import Producer, SessionNotFound

    producer = Producer(cli_settings())
    try:
        info = producer.session_info(request_id)
    except SessionNotFound:
        raise click.ClickException(f"no session for request {request_id} (yet)") from None
    finally:
        producer.close()
    _print_info(info)


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include ended and failed sessions.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON array: full ids, times in UTC.")
def sessions(show_all: bool, limit: int, as_json: bool) -> None:
    """A table of sessions (live ones unless --all), times in UTC; never shows tokens."""
    from orchestrator.db import Database
    from orchestrator.reporting import session_records, session_table

    settings = cli_settings()
    database = Database(settings.effective_database_url, pool_size=1)
    try:
        if as_json:
            records = session_records(database, live_only=not show_all, limit=limit)
            click.echo(json.dumps(records, indent=2))
        else:
            click.echo(session_table(database, live_only=not show_all, limit=limit))
    finally:
        database.dispose()
