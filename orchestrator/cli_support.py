"""What the command line's modules share: the settings, telemetry, the exit code of a failed
request."""

from __future__ import annotations

import click

from orchestrator.config import ConfigError, Settings, load_settings

# `status` and `enqueue --wait`: the request ended as `failed` (1 is an error, 2 a usage error).
EXIT_SESSION_FAILED = 3


def cli_telemetry(*, serve_metrics: bool = False) -> None:
    from orchestrator.telemetry import setup_telemetry

    try:
        setup_telemetry(serve_metrics=serve_metrics)
    except ValueError as error:
        raise click.ClickException(str(error)) from None


def cli_settings(*, consistent: bool = False) -> Settings:
    """The settings; with ``consistent``, also checked against each other (worker, beat)."""
    try:
        settings = load_settings()
        if consistent:
            settings.check_consistency()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    return settings
