"""``orchestrator tenants``: each tenant's policy beside its usage (``tenants`` and
``tenant_totals``, migrations 0009 and 0012), and ``tenants set`` to change a policy: the
next claim or admission applies it, no restart (added to the group of
:mod:`orchestrator.cli`)."""

from __future__ import annotations

import json
from typing import Any

import click

from orchestrator.cli_support import cli_settings

COLUMNS = ("tenant", "guaranteed", "reserved", "max", "weight", "max waiting", "in use", "waiting")


def _database() -> Any:
    from orchestrator.db import Database

    settings = cli_settings()
    return Database(settings.effective_database_url, pool_size=1)


def _none(value: object) -> str:
    return "-" if value is None else str(value)


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@click.pass_context
def tenants(ctx: click.Context, as_json: bool) -> None:
    """The tenants: policy (guaranteed, reserved, maximum, weight, waiting cap) and usage."""
    if ctx.invoked_subcommand is not None:
        return
    from orchestrator.store.tenants import policies, usage
    from orchestrator.tenants import default_policy

    db = _database()
    try:
        configured, used = policies(db), {u.name: u for u in usage(db)}
    finally:
        db.dispose()
    documents: list[dict[str, Any]] = []
    for name in sorted(set(configured) | set(used)):
        p = configured.get(name) or default_policy(name)
        u = used.get(name)
        documents.append(
            {
                "tenant": name,
                "guaranteed": p.guaranteed,
                "reserved": p.reserved,
                "maximum": p.maximum,
                "weight": p.weight,
                "max_waiting": p.waiting_cap,
                "in_use": u.in_use if u else 0,
                "waiting": u.waiting if u else 0,
                "oldest_waiting_at": u.oldest_waiting_at.isoformat()
                if u and u.oldest_waiting_at
                else None,
                "configured": name in configured,
            }
        )
    if as_json:
        click.echo(json.dumps(documents, indent=2))
        return
    rows: list[tuple[str, ...]] = [COLUMNS] + [
        (
            d["tenant"],
            str(d["guaranteed"]),
            str(d["reserved"]),
            _none(d["maximum"]),
            f"{d['weight']:g}",
            _none(d["max_waiting"]),
            str(d["in_use"]),
            str(d["waiting"]),
        )
        for d in documents
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


@tenants.command("set")
@click.argument("name")
@click.option("--guaranteed", type=int, default=0, show_default=True)
@click.option("--max", "maximum", type=int, default=None, help="Most live slots; none: no cap.")
@click.option("--weight", type=float, default=1.0, show_default=True)
@click.option("--reserved", type=int, default=0, show_default=True, help="Not lendable part.")
@click.option("--max-waiting", type=int, default=None, help="Most waiting requests.")
def set_tenant(
    name: str,
    guaranteed: int,
    maximum: int | None,
    weight: float,
    reserved: int,
    max_waiting: int | None,
) -> None:
    """Create or replace tenant NAME's policy (the next admission decision applies it)."""
    from orchestrator.store.tenants import set_policy
    from orchestrator.tenants import PolicyError, TenantPolicy

    try:
        policy = TenantPolicy(
            name=name,
            guaranteed=guaranteed,
            maximum=maximum,
            weight=weight,
            waiting_cap=max_waiting,
            reserved=reserved,
        )
    except PolicyError as error:
        raise click.ClickException(str(error)) from None
    db = _database()
    try:
        set_policy(db, policy)
    finally:
        db.dispose()
    click.echo(
        f"tenant {name}: guaranteed {guaranteed} (reserved {reserved}), max {_none(maximum)},"
        f" weight {weight:g}, max waiting {_none(max_waiting)}"
    )
