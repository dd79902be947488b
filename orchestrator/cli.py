"""``orchestrator`` command line: worker, beat, db, queues, simulator, health, check, demo; the
producer's commands (enqueue, stop, status, sessions) are in :mod:`orchestrator.cli_sessions`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from orchestrator.accounts import check_accounts
from orchestrator.cli_accounts import accounts
from orchestrator.cli_errors import describe
from orchestrator.cli_sessions import enqueue, sessions, status, stop
from orchestrator.cli_support import EXIT_SESSION_FAILED, cli_settings, cli_telemetry
from orchestrator.cli_tenants import tenants
from orchestrator.cli_webhooks import webhooks
from orchestrator.config import (
    DEFAULT_CONTROL_THREADS,
    DEFAULT_START_THREADS,
    Settings,
)
from orchestrator.logging_setup import configure_logging

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger(__name__)


def _debugging(ctx: click.Context) -> bool:
    level = os.environ.get("ORCHESTRATOR_LOG_LEVEL", "").strip().upper()
    return bool(ctx.params.get("debug")) or level == "DEBUG"


class _Group(click.Group):
    """An error an operator can fix (a setting, the database, the broker, the vendor, a
    migration revision: :func:`orchestrator.cli_errors.describe`) is one line on stderr, not
    a traceback, unless ``--debug`` or ``ORCHESTRATOR_LOG_LEVEL=DEBUG`` asks for it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except Exception as error:
            line = describe(error)
            if line is None or _debugging(ctx):
                raise
            raise click.ClickException(line) from None


@click.group(cls=_Group)
@click.version_option(package_name="session-orchestrator")
@click.option("--debug", is_flag=True, help="Show the traceback of any error.")
def main(debug: bool) -> None:
    """Start, track and end DeepBrain AI Streamer sessions (see README.md)."""


def _configure_logging(settings: Settings) -> list[str]:
    """Logging as the settings ask; Celery's options to match (its banner is not JSON)."""
    chosen = configure_logging(settings.log_level, settings.log_format)
    return ["--quiet"] if chosen == "json" else []


def _check_schema(settings: Settings) -> None:
    """A database of another revision is one line now, not a failure in every task; an
    unreachable one is not (tasks retry until it is back)."""
    from sqlalchemy.exc import DBAPIError

    from orchestrator.preflight import NotMigrated, schema_revision

    try:
        schema_revision(settings.effective_database_url)
    except NotMigrated as error:
        raise click.ClickException(str(error)) from None
    except DBAPIError as error:
        logger.warning("starting without the database: %s", describe(error))


@main.command()
@click.option("--queues", default="orchestrator.start,orchestrator.control", show_default=True)
@click.option(
    "--pool",
    type=click.Choice(["threads", "prefork", "solo"]),
    default="threads",
    show_default=True,
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 2000),
    default=DEFAULT_START_THREADS,
    show_default=True,
    help="Tasks at once: the start threads when the threads pool serves both queues.",
)
@click.option(
    "--control-concurrency",
    type=click.IntRange(1, 500),
    default=DEFAULT_CONTROL_THREADS,
    show_default=True,
    help="Threads of their own for stops and sweeps when the threads pool serves both queues.",
)
@click.option("--beat", "with_beat", is_flag=True, help="Also run beat inside (one process only).")
@click.option("--hostname", default="orchestrator@%h", show_default=True)
@click.option(
    "--events", is_flag=True, help="Send task events (Flower, `celery events`); off by default."
)
def worker(
    queues: str,
    pool: str,
    concurrency: int,
    control_concurrency: int,
    with_beat: bool,
    hostname: str,
    events: bool,
) -> None:
    """Run a Celery worker consuming the start and control queues. With the threads pool on
    both (the default), stops and sweeps run on threads of their own, never behind starts."""
    from orchestrator.publishing import topology
    from orchestrator.worker.celery_app import create_app

    settings = cli_settings(consistent=True)
    celery_options = _configure_logging(settings)
    cli_telemetry(serve_metrics=True)
    check_accounts(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # Resolved before the pool and beat start: with no URL set this starts (or joins) the
    # embedded database now, and a failure is one line here rather than in every task.
    _check_schema(settings)
    app = create_app(settings)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=10)
        topology(settings).declare(connection)
    argv = [
        *celery_options,
        "worker",
        *_pool_options(app, pool, queues, control_concurrency),
        f"--concurrency={concurrency}",
        f"--queues={queues}",
        f"--loglevel={settings.log_level}",
        f"--hostname={hostname}",
        "--without-gossip",
        "--without-mingle",
    ]
    if with_beat:
        argv.append("--beat")
    if events:
        argv.append("--task-events")
    app.worker_main(argv)


def _pool_options(app: Any, pool: str, queues: str, control_threads: int) -> list[str]:
    """``--pool``; or, for the threads pool on both queues, the split pool (Celery takes a
    pool class from ``worker_pool`` when ``--pool`` is not given)."""
    from orchestrator.messaging import CONTROL_QUEUE, START_QUEUE
    from orchestrator.worker.pool import CONTROL_THREADS_SETTING, SPLIT_POOL

    served = {q.strip() for q in queues.split(",")}
    if pool != "threads" or not {START_QUEUE, CONTROL_QUEUE} <= served:
        return [f"--pool={pool}"]
    app.conf.worker_pool = SPLIT_POOL
    app.conf[CONTROL_THREADS_SETTING] = control_threads
    return []


@main.command()
def beat() -> None:
    """Run Celery beat: the reaper and reconciler schedules (run exactly one)."""
    from orchestrator.worker.celery_app import create_app

    settings = cli_settings(consistent=True)
    celery_options = _configure_logging(settings)
    cli_telemetry(serve_metrics=True)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    if settings.database_url:
        # As the worker: one line, not schedules for a schema it does not serve. Beat needs
        # no database of its own (the chart gives it none): without a URL it checks nothing.
        _check_schema(settings)
    app = create_app(settings)
    app.start([*celery_options, "beat", f"--loglevel={settings.log_level}"])


@main.group()
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Migrate the database to REVISION (default: head). Safe to run twice at once."""
    from orchestrator.db.migrate import upgrade

    settings = cli_settings()
    configure_logging(settings.log_level, settings.log_format)
    upgrade(settings.effective_database_url, revision)
    click.echo(f"database at {revision}")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Migrate the database down to REVISION (e.g. base)."""
    from orchestrator.db.migrate import downgrade

    settings = cli_settings()
    configure_logging(settings.log_level, settings.log_format)
    downgrade(settings.effective_database_url, revision)
    click.echo(f"database at {revision}")


@db.command("stop-embedded")
def db_stop_embedded() -> None:
    """Stop the embedded PostgreSQL of the state folder, whoever still uses it."""
    from orchestrator.db import embedded

    settings = cli_settings()
    try:
        stopped = embedded.stop(settings.state_dir)
    except embedded.EmbeddedPostgresError as error:
        raise click.ClickException(str(error)) from None
    click.echo("stopped" if stopped else f"no embedded PostgreSQL runs in {settings.state_dir}")


@main.group()
def queues() -> None:
    """The broker's queues (RabbitMQ)."""


@queues.command("migrate")
@click.option(
    "--to",
    "queue_type",
    type=click.Choice(["quorum", "classic"]),
    default=None,
    help="The queue type to move to (default: ORCHESTRATOR_QUEUE_TYPE).",
)
def queues_migrate(queue_type: str | None) -> None:
    """Redeclare the queues as the settings ask (quorum or classic, the delivery limit),
    moving their messages aside and back: stop every worker first (docs/operations.md)."""
    from orchestrator.celery_publishing import publishing_app
    from orchestrator.messaging import Topology
    from orchestrator.queue_migration import MigrationRefused, migrate

    settings = cli_settings()
    configure_logging(settings.log_level, settings.log_format)
    if not settings.effective_broker_url.startswith(("amqp", "pyamqp")):
        raise click.ClickException("only a RabbitMQ broker (amqp://) has queues to migrate")
    chosen = queue_type or settings.queue_type
    target = Topology("quorum" if chosen == "quorum" else "classic", settings.delivery_limit)
    app = publishing_app(settings)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)
            reports = migrate(connection, target, progress=click.echo)
    except MigrationRefused as error:
        raise click.ClickException(str(error)) from None
    finally:
        app.close()
    for report in reports:
        click.echo(report.line(target.queue_type))
    if chosen != settings.queue_type:
        click.echo(f"now set ORCHESTRATOR_QUEUE_TYPE={chosen} for every process")


def _simulator_module() -> Any:
    """The simulator package, or one line saying which extra brings it."""
    try:
        from orchestrator import simulator
    except ImportError as error:
        raise click.ClickException(
            f"the simulator needs the [simulator] extra ({error.name} is missing):"
            " pip install 'session-orchestrator[simulator]'"
        ) from None
    return simulator


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8800, show_default=True)
@click.option("--latency", type=float, help="Seconds added to every request.")
@click.option("--failure-rate", "failure_rates", multiple=True, help="ENDPOINT=P, e.g. start=0.1")
@click.option("--max-concurrent", type=int, help="Vendor concurrent-session limit.")
@click.option("--idle-timeout", help="Seconds without ping before IDLE_TIMEOUT ('none' disables).")
@click.option("--token-ttl", type=float, help="Session token lifetime in seconds.")
@click.option("--app-id", help="Accepted appId (default demo-app-id).")
@click.option("--user-key", help="Accepted userKey (default demo-user-key).")
@click.option(
    "--accounts-file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON list of accounts to serve, each with its own keys, cap and faults.",
)
def simulator(
    host: str,
    port: int,
    latency: float | None,
    failure_rates: tuple[str, ...],
    max_concurrent: int | None,
    idle_timeout: str | None,
    token_ttl: float | None,
    app_id: str | None,
    user_key: str | None,
    accounts_file: str | None,
) -> None:
    """Serve a fake DeepBrain API (for the demo, tests, staging)."""
    sim = _simulator_module()

    configure_logging("INFO")
    try:
        config = sim.SimulatorConfig.from_options(
            latency=latency,
            failure_rates=failure_rates,
            max_concurrent=max_concurrent,
            idle_timeout=idle_timeout,
            token_ttl=token_ttl,
            app_id=app_id,
            user_key=user_key,
            accounts_file=accounts_file,
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    sim.run(config, host, port, on_ready=lambda url: click.echo(f"simulator on {url}", err=True))


@main.command()
@click.argument("role", type=click.Choice(["worker", "beat", "webhooks"]))
def health(role: str) -> None:
    """Exit 0 if this pod's worker/beat/webhook sender heartbeat is fresh (liveness probes)."""
    from orchestrator.heartbeat import age_seconds

    settings = cli_settings()
    age = age_seconds(settings.state_dir, role)
    if age is None:
        raise click.ClickException(f"no {role} heartbeat yet in {settings.state_dir}")
    if age > settings.heartbeat_max_age_seconds:
        raise click.ClickException(f"{role} heartbeat is {age:.0f} s old")
    click.echo(f"{role} ok ({age:.0f} s)")


@main.command()
@click.option("--vendor/--no-vendor", default=True, show_default=True, help="Also ask the vendor.")
def check(vendor: bool) -> None:
    """Check the settings, the database (reachable, migrated), the broker and the vendor
    with every account's key: one line each; exit 1 if any is not ready (e.g. before a
    rollout, or as an init step)."""
    from orchestrator import preflight

    settings = cli_settings(consistent=True)
    checks: list[tuple[str, Callable[[], str]]] = [
        (
            "database",
            lambda: f"at revision {preflight.schema_revision(settings.effective_database_url)}",
        ),
        ("broker", lambda: f"connected ({preflight.broker_reachable(settings)})"),
    ]
    if vendor:
        checks.extend(preflight.vendor_checks(settings))
    failed = False
    for name, run_check in checks:
        try:
            click.echo(f"{name}: ok, {run_check()}")
        except Exception as error:
            line = describe(error) or (
                str(error) if isinstance(error, preflight.NotMigrated) else None
            )
            if line is None:
                raise
            failed = True
            click.echo(f"{name}: FAILED, {line}")
    if failed:
        sys.exit(1)


@main.command()
@click.option("--sessions", "count", type=click.IntRange(2, 20), default=5, show_default=True)
def demo(count: int) -> None:
    """Run the whole lifecycle on embedded defaults against the simulator (no servers)."""
    _simulator_module()
    from orchestrator.demo import run_demo

    sys.exit(run_demo(count))


for _command in (enqueue, stop, status, sessions, accounts, tenants, webhooks):
    main.add_command(_command)

__all__ = ["EXIT_SESSION_FAILED", "main"]

if __name__ == "__main__":
    main()
