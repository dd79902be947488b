"""The accounts' rows in ``vendor_accounts``: the catalog's part synced in, the operator's
switches (enable, disable, drain), the health the vendor calls report, and a recount check.

Never a secret: an account's keys stay in the catalog (environment or mounted Secret).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import bindparam, text

from orchestrator.db import Database, EventKind
from orchestrator.db.types import JSONDocument
from orchestrator.store import history

MAX_ERROR_LENGTH = 500


@dataclass(frozen=True)
class CatalogEntry:
    """What the database keeps of an account definition (no secret)."""

    name: str
    cap: int | None
    weight: float
    labels: Mapping[str, str]


_SYNC = text(
    "INSERT INTO vendor_accounts AS a (name, configured_cap, weight, labels, in_catalog,"
    " updated_at) VALUES (:name, :cap, :weight, :labels, true, now())"
    " ON CONFLICT (name) DO UPDATE SET configured_cap = EXCLUDED.configured_cap,"
    " weight = EXCLUDED.weight, labels = EXCLUDED.labels, in_catalog = true,"
    " limited_cap = CASE WHEN a.configured_cap IS DISTINCT FROM EXCLUDED.configured_cap"
    "   THEN NULL ELSE a.limited_cap END, updated_at = now()"
    " WHERE (a.configured_cap, a.weight, a.labels, a.in_catalog)"
    "   IS DISTINCT FROM (EXCLUDED.configured_cap, EXCLUDED.weight, EXCLUDED.labels, true)"
).bindparams(bindparam("labels", type_=JSONDocument))


def sync_catalog(db: Database, entries: list[CatalogEntry]) -> bool:
    """Make the rows match the catalog: one per account (name order, so concurrent syncs
    lock rows in one order); accounts no longer defined are marked out of the catalog (no
    new starts; their live sessions, if any, keep their row and need their key back to be
    stopped). Writes only what changed."""
    names = sorted(e.name for e in entries)
    with db.transaction() as session:
        for entry in sorted(entries, key=lambda e: e.name):
            session.execute(
                _SYNC,
                {
                    "name": entry.name,
                    "cap": entry.cap,
                    "weight": entry.weight,
                    "labels": dict(entry.labels),
                },
            )
        session.execute(
            text(
                "UPDATE vendor_accounts SET in_catalog = false, updated_at = now()"
                " WHERE in_catalog AND NOT (name = ANY(:names))"
            ),
            {"names": names},
        )
    return True


@dataclass(frozen=True)
class AccountState:
    """One account as ``orchestrator accounts`` shows it."""

    name: str
    configured_cap: int | None
    reported_limit: int | None
    effective_cap: int | None
    in_use: int
    waiting: int
    weight: float
    labels: dict[str, str]
    in_catalog: bool
    enabled: bool
    draining: bool
    circuit_open_until: datetime | None
    consecutive_failures: int
    disabled_reason: str | None
    last_error: str | None
    last_error_at: datetime | None

    @property
    def health(self) -> str:
        if not self.in_catalog:
            return "removed"
        if not self.enabled:
            return "disabled"
        if self.circuit_open_until is not None:
            return "circuit-open"
        if self.draining:
            return "draining"
        return "ok"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "configured_cap": self.configured_cap,
            "reported_limit": self.reported_limit,
            "effective_cap": self.effective_cap,
            "in_use": self.in_use,
            "waiting": self.waiting,
            "weight": self.weight,
            "labels": self.labels,
            "health": self.health,
            "enabled": self.enabled,
            "draining": self.draining,
            "circuit_open_until": _iso(self.circuit_open_until),
            "consecutive_failures": self.consecutive_failures,
            "disabled_reason": self.disabled_reason,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def account_states(db: Database) -> list[AccountState]:
    with db.transaction() as session:
        rows = session.execute(
            text(
                "SELECT name, configured_cap, reported_limit, effective_cap, in_use, waiting,"
                " weight, labels, in_catalog, enabled, draining,"
                " CASE WHEN circuit_open_until > now() THEN circuit_open_until END"
                "   AS circuit_open_until, consecutive_failures, disabled_reason, last_error,"
                " last_error_at FROM vendor_accounts ORDER BY name"
            )
        ).all()
    return [AccountState(**row._mapping) for row in rows]


class Switch(Enum):
    ENABLE = "enable"
    DISABLE = "disable"
    DRAIN = "drain"


_SWITCH = {
    Switch.ENABLE: "enabled = true, draining = false, disabled_reason = NULL,"
    " consecutive_failures = 0, circuit_open_until = NULL, circuit_cooldown_seconds = NULL",
    Switch.DISABLE: "enabled = false, disabled_reason = :reason",
    Switch.DRAIN: "draining = true",
}


def switch(
    db: Database, name: str, how: Switch, *, reason: str = "disabled by an operator"
) -> bool:
    """Apply an operator's switch; False if no such account row."""
    with db.transaction() as session:
        found = session.execute(
            text(
                f"UPDATE vendor_accounts SET {_SWITCH[how]}, updated_at = now()"  # noqa: S608
                " WHERE name = :name RETURNING name"
            ),
            {"name": name, "reason": reason[:200]},
        ).one_or_none()
    return found is not None


@dataclass(frozen=True)
class Drift:
    name: str
    in_use: int
    counted_in_use: int
    waiting: int
    counted_waiting: int


def drift(db: Database) -> list[Drift]:
    """Accounts whose counters differ from a count of their rows, read in one snapshot (the
    counters change in the same transactions as the rows, so no lock is needed)."""
    with db.transaction() as session:
        rows = session.execute(
            text(
                "SELECT name, in_use, counted_in_use, waiting, counted_waiting"
                " FROM account_counts WHERE in_use <> counted_in_use"
                " OR waiting <> counted_waiting ORDER BY name"
            )
        ).all()
    return [Drift(**row._mapping) for row in rows]


# -- health ---------------------------------------------------------------------------------


def record_success(db: Database, name: str) -> None:
    """A vendor call on the account succeeded: its failure streak ends, its circuit closes.
    Writes only when there is something to clear (the usual call takes no lock)."""
    with db.transaction() as session:
        session.execute(
            text(
                "UPDATE vendor_accounts SET consecutive_failures = 0, circuit_open_until = NULL,"
                " circuit_cooldown_seconds = NULL, updated_at = now()"
                " WHERE name = :name AND (consecutive_failures <> 0"
                " OR circuit_open_until IS NOT NULL)"
            ),
            {"name": name},
        )


def record_failure(
    db: Database,
    name: str,
    error: str,
    *,
    threshold: int,
    cooldown_seconds: float,
    max_cooldown_seconds: float,
) -> bool:
    """A vendor call on the account failed (network, timeout, 5xx). The ``threshold``-th
    failure in a row opens the circuit for ``cooldown_seconds``, doubling up to
    ``max_cooldown_seconds`` while it keeps failing. True if this call opened it."""
    with db.transaction() as session:
        found = session.execute(
            text(
                "UPDATE vendor_accounts SET consecutive_failures = consecutive_failures + 1,"
                " last_error = :error, last_error_at = now(), updated_at = now(),"
                " circuit_cooldown_seconds = CASE WHEN consecutive_failures + 1 >= :threshold"
                "   THEN least(:max, coalesce(circuit_cooldown_seconds * 2, :cooldown))"
                "   ELSE circuit_cooldown_seconds END,"
                " circuit_open_until = CASE WHEN consecutive_failures + 1 >= :threshold"
                "   THEN now() + make_interval(secs => least(:max,"
                "     coalesce(circuit_cooldown_seconds * 2, :cooldown)))"
                "   ELSE circuit_open_until END"
                " WHERE name = :name"
                " RETURNING consecutive_failures = :threshold AS opened"
            ),
            {
                "name": name,
                "error": error[:MAX_ERROR_LENGTH],
                "threshold": threshold,
                "cooldown": cooldown_seconds,
                "max": max_cooldown_seconds,
            },
        ).one_or_none()
    return bool(found is not None and found.opened)


def disable_refused(db: Database, name: str, error: str) -> bool:
    """The vendor refused the account's key: disabled until an operator enables it. True if
    this call disabled it (it was enabled)."""
    with db.transaction() as session:
        found = session.execute(
            text(
                "UPDATE vendor_accounts SET enabled = false, disabled_reason = :reason,"
                " last_error = :error, last_error_at = now(), updated_at = now()"
                " WHERE name = :name AND enabled RETURNING name"
            ),
            {
                "name": name,
                "reason": "the vendor refused its key",
                "error": error[:MAX_ERROR_LENGTH],
            },
        ).one_or_none()
    return found is not None


def lower_cap_to_in_use(db: Database, name: str, error: str) -> int | None:
    """The vendor answered "limit reached" while we counted a free slot: someone else holds
    the difference. The account's cap drops to what it has live (the refused attempt still
    counted, so it is the one that tries again; refused again at that cap, one lower); the
    new effective cap. :func:`probe_cap_up` raises it again while the vendor accepts."""
    with db.transaction() as session:
        found = session.execute(
            text(
                "UPDATE vendor_accounts SET limited_cap = CASE"
                "   WHEN limited_cap IS NOT NULL AND in_use >= limited_cap"
                "   THEN greatest(in_use - 1, 0)"  # refused again at it: the attempt is extra
                "   ELSE least(coalesce(limited_cap, in_use), in_use) END,"
                " last_error = :error, last_error_at = now(), updated_at = now()"
                " WHERE name = :name RETURNING effective_cap"
            ),
            {"name": name, "error": error[:MAX_ERROR_LENGTH]},
        ).one_or_none()
    return None if found is None else found.effective_cap


def log_account_disabled(db: Database, name: str, reason: str) -> None:
    """The ``account.disabled`` event, in ``session_events`` (no session; the account in
    ``detail``)."""
    with db.transaction() as session:
        history.log(session, EventKind.ACCOUNT_DISABLED, account=name, reason=reason)


def probe_cap_up(db: Database, name: str, *, quiet_seconds: float) -> None:
    """A lowered cap goes up by one when the vendor sent no limit reply for
    ``quiet_seconds`` (the reconciler calls this once a pass); back to none at the
    configured or reported cap."""
    with db.transaction() as session:
        session.execute(
            text(
                "UPDATE vendor_accounts SET updated_at = now(), limited_cap = CASE"
                "   WHEN limited_cap + 1 >= coalesce(least(configured_cap,"
                "     nullif(reported_limit, 0)), limited_cap + 1) THEN NULL"
                "   ELSE limited_cap + 1 END"
                " WHERE name = :name AND limited_cap IS NOT NULL AND (last_error_at IS NULL"
                " OR last_error_at < now() - make_interval(secs => :quiet))"
            ),
            {"name": name, "quiet": quiet_seconds},
        )
