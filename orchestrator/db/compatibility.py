"""The compatibility window: which older releases a schema still serves.

Every migration from 0005 on records one row in ``schema_compatibility``: its revision, the
revision before it, and the oldest release head whose code still runs on the schema it leaves
(an expansion keeps the previous value; a contract step raises it to the release that no
longer needs what it removed). A worker whose head is older than the database's revision
starts if its head lies on the recorded chain at or after that oldest head
(:func:`served`); see docs/operations.md, "Upgrades".

In a migration (the whole API)::

    from orchestrator.db.compatibility import declare, withdraw

    def upgrade() -> None:
        ...
        declare(revision, down_revision, oldest_served="0005")

    def downgrade() -> None:
        withdraw(revision)
        ...
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

TABLE = "schema_compatibility"


@dataclass(frozen=True)
class Declaration:
    revision: str
    down_revision: str | None
    oldest_served: str


def declare(revision: str, down_revision: str | None, oldest_served: str) -> None:
    """Record that the schema at ``revision`` serves every release from ``oldest_served``
    (a revision at or before ``revision``) up to ``revision``. Call it last in ``upgrade()``."""
    from alembic import op

    op.get_bind().execute(
        text(
            "INSERT INTO schema_compatibility (revision, down_revision, oldest_served_revision)"
            " VALUES (:revision, :down, :oldest)"
            " ON CONFLICT (revision) DO UPDATE SET down_revision = EXCLUDED.down_revision,"
            " oldest_served_revision = EXCLUDED.oldest_served_revision, recorded_at = now()"
        ),
        {"revision": revision, "down": down_revision, "oldest": oldest_served},
    )


def withdraw(revision: str) -> None:
    """Remove ``revision``'s row; call it first in ``downgrade()``."""
    from alembic import op

    op.get_bind().execute(
        text("DELETE FROM schema_compatibility WHERE revision = :r"), {"r": revision}
    )


def declarations(connection: Connection) -> dict[str, Declaration]:
    """Every recorded row by revision; none if the table does not exist (a schema before 0005)."""
    if connection.execute(text("SELECT to_regclass(:t)"), {"t": TABLE}).scalar() is None:
        return {}
    rows = connection.execute(
        text("SELECT revision, down_revision, oldest_served_revision FROM schema_compatibility")
    )
    return {r[0]: Declaration(r[0], r[1], r[2]) for r in rows}


def served(
    current: str, head: str, known: set[str], recorded: dict[str, Declaration]
) -> str | None:
    """None if a program at ``head`` (which knows the revisions ``known``, its head and every
    one before it) may run on a database at ``current``; else why not, in a few words.

    The chain is walked down from ``current`` through the recorded rows to ``head``: a database
    on another branch never passes. The row of ``current`` says how far back it serves."""
    declaration = recorded.get(current)
    if declaration is None:
        return "it declares no compatibility window"
    if declaration.oldest_served not in known:
        return f"it serves releases from revision {declaration.oldest_served} on"
    step: str | None = current
    seen: set[str] = set()
    while step is not None and step not in seen:
        if step == head:
            return None
        seen.add(step)
        row = recorded.get(step)
        step = row.down_revision if row is not None else None
    return f"its recorded history does not pass through revision {head}"
