"""``orchestrator webhooks``: manage endpoints (add, list, rotate, disable, enable, replay),
print a new encryption key, and run the sender (``send``). A signing secret is printed once,
when it is made; no command shows a stored one."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import click

from orchestrator.cli_support import cli_settings
from orchestrator.config import ConfigError
from orchestrator.db import Database
from orchestrator.logging_setup import configure_logging
from orchestrator.webhooks import endpoints
from orchestrator.webhooks.secrets import SecretBox, new_key
from orchestrator.webhooks.sender import Sender, policy_for
from orchestrator.webhooks.settings import WebhookSettings, load_webhook_settings

LIST_COLUMNS = (
    "id",
    "enabled",
    "url",
    "event_types",
    "tenant",
    "disabled_reason",
    "failing_since",
    "signing_keys",
    "pending",
    "given_up_24h",
)


def _webhook_settings() -> WebhookSettings:
    try:
        return load_webhook_settings()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


@contextmanager
def _database(pool_size: int = 1) -> Iterator[Database]:
    database = Database(cli_settings().effective_database_url, pool_size=pool_size)
    try:
        yield database
    finally:
        database.dispose()


@click.group()
def webhooks() -> None:
    """HTTP callbacks of the lifecycle events (Standard Webhooks; docs/messages.md)."""


@webhooks.command()
def key() -> None:
    """Print a new key for ORCHESTRATOR_WEBHOOK_SECRET_KEY (encrypts the signing secrets)."""
    click.echo(new_key())


@webhooks.command()
@click.argument("url")
@click.option(
    "--event",
    "event_types",
    multiple=True,
    type=click.Choice(endpoints.EVENT_TYPES),
    help="An event type to send (repeat; default: the three session events).",
)
@click.option("--tenant", help="Only events whose data.tenant is this.")
@click.option("--description")
def add(
    url: str, event_types: tuple[str, ...], tenant: str | None, description: str | None
) -> None:
    """Add an endpoint; prints its id and its signing secret (shown this once)."""
    settings = _webhook_settings()
    with _database() as db:
        added = endpoints.add(
            db,
            SecretBox(settings.secret_key),
            policy_for(settings),
            url,
            event_types=event_types or endpoints.DEFAULT_EVENT_TYPES,
            tenant=tenant,
            description=description,
        )
    click.echo(f"endpoint {added.endpoint_id}")
    click.echo(f"signing secret {added.secret}")


@webhooks.command(name="list")
def list_endpoints() -> None:
    """Endpoints with their state and delivery counts (no secret)."""
    with _database() as db:
        rows = endpoints.listing(db)
    for row in rows:
        click.echo("  ".join(f"{c}={_shown(row[c])}" for c in LIST_COLUMNS))


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value)
    return "-" if value is None else str(value)


@webhooks.command()
@click.argument("endpoint_id", type=click.UUID)
def rotate(endpoint_id: uuid.UUID) -> None:
    """A new signing secret; the old ones keep signing for
    ORCHESTRATOR_WEBHOOK_ROTATION_GRACE_SECONDS (both signatures are sent meanwhile)."""
    settings = _webhook_settings()
    with _database() as db:
        secret = endpoints.rotate(
            db, SecretBox(settings.secret_key), endpoint_id, settings.rotation_grace_seconds
        )
    click.echo(f"signing secret {secret}")


@webhooks.command()
@click.argument("endpoint_id", type=click.UUID)
def disable(endpoint_id: uuid.UUID) -> None:
    """Stop sending to an endpoint (its pending deliveries are given up)."""
    with _database() as db:
        changed = endpoints.set_disabled(db, endpoint_id)
    click.echo(f"endpoint {endpoint_id} {'disabled' if changed else 'was already disabled'}")


@webhooks.command()
@click.argument("endpoint_id", type=click.UUID)
def enable(endpoint_id: uuid.UUID) -> None:
    """Send to an endpoint again (use replay for what it missed)."""
    with _database() as db:
        endpoints.enable(db, endpoint_id)
    click.echo(f"endpoint {endpoint_id} enabled")


@webhooks.command()
@click.option("--event-id", type=click.UUID, help="One event, by its event_id.")
@click.option("--since", type=click.DateTime(), help="Events created at or after (UTC).")
@click.option("--until", type=click.DateTime(), help="Events created before (UTC).")
@click.option("--endpoint", "endpoint_id", type=click.UUID, help="Only this endpoint.")
def replay(
    event_id: uuid.UUID | None,
    since: datetime | None,
    until: datetime | None,
    endpoint_id: uuid.UUID | None,
) -> None:
    """Send events still in the outbox again (same webhook-id), by id or time range."""
    if event_id is None and since is None:
        raise click.UsageError("give --event-id or --since")
    with _database() as db:
        count = endpoints.replay(
            db, event_id=event_id, since=_utc(since), until=_utc(until), endpoint_id=endpoint_id
        )
    click.echo(f"{count} deliveries queued")


def _utc(value: datetime | None) -> datetime | None:
    from datetime import UTC

    return None if value is None else value.replace(tzinfo=UTC)


@webhooks.command()
def send() -> None:
    """Run the sender: outbox events to the endpoints, until SIGTERM or SIGINT."""
    settings = cli_settings()
    configure_logging(settings.log_level, settings.log_format)
    webhook_settings = _webhook_settings()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    pool = min(webhook_settings.concurrency + 2, 50)
    from orchestrator.heartbeat import touch

    with _database(pool_size=pool) as db:
        Sender(db, webhook_settings, heartbeat=lambda: touch(settings.state_dir, "webhooks")).run(
            stop
        )
