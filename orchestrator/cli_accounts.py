"""``orchestrator accounts``: the vendor accounts' state (from ``vendor_accounts``, never a
secret), the operator's switches, and a recount check (added to the group of
:mod:`orchestrator.cli`)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from orchestrator.cli_support import cli_settings

DONE = {"enable": "enabled", "disable": "disabled", "drain": "drained"}
COLUMNS = ("name", "cap", "in use", "waiting", "weight", "labels", "health", "last error")


def _database() -> Any:
    from orchestrator.db import Database

    settings = cli_settings()
    return Database(settings.effective_database_url, pool_size=1)


def _row(state: Any) -> tuple[str, ...]:
    cap = "-" if state.effective_cap is None else str(state.effective_cap)
    if state.configured_cap is not None and state.configured_cap != state.effective_cap:
        cap += f" (of {state.configured_cap})"
    labels = ",".join(f"{k}={v}" for k, v in sorted(state.labels.items())) or "-"
    error = state.disabled_reason or state.last_error or "-"
    return (
        state.name,
        cap,
        str(state.in_use),
        str(state.waiting),
        f"{state.weight:g}",
        labels,
        state.health,
        error[:60],
    )


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@click.pass_context
def accounts(ctx: click.Context, as_json: bool) -> None:
    """The vendor accounts: cap, in use, waiting, health, last error."""
    if ctx.invoked_subcommand is not None:
        return
    from orchestrator import store

    db = _database()
    try:
        states = store.account_states(db)
    finally:
        db.dispose()
    if as_json:
        click.echo(json.dumps([s.as_json() for s in states], indent=2))
        return
    rows = [COLUMNS, *(_row(s) for s in states)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _switch(name: str, how: str) -> None:
    from orchestrator import store

    db = _database()
    try:
        found = store.switch(db, name, store.Switch(how))
    finally:
        db.dispose()
    if not found:
        raise click.ClickException(f"no account named {name!r} (see `orchestrator accounts`)")
    click.echo(f"account {name}: {DONE[how]}")


@accounts.command("enable")
@click.argument("name")
def accounts_enable(name: str) -> None:
    """Take new starts again (also clears a refused key's disable and an open circuit)."""
    _switch(name, "enable")


@accounts.command("disable")
@click.argument("name")
def accounts_disable(name: str) -> None:
    """No new starts; live sessions still end with its key."""
    _switch(name, "disable")


@accounts.command("drain")
@click.argument("name")
def accounts_drain(name: str) -> None:
    """No new starts while its live sessions end normally (then it can be removed)."""
    _switch(name, "drain")


@accounts.command("verify")
def accounts_verify() -> None:
    """Compare each account's counters with a count of its rows; exit 1 on any drift."""
    from orchestrator import store

    db = _database()
    try:
        drifts = store.drift(db)
    finally:
        db.dispose()
    if not drifts:
        click.echo("counters match the rows")
        return
    for d in drifts:
        click.echo(
            f"account {d.name}: in_use {d.in_use} (rows: {d.counted_in_use}),"
            f" waiting {d.waiting} (rows: {d.counted_waiting})"
        )
    sys.exit(1)
