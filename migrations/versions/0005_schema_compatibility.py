"""schema compatibility: which older releases each revision still serves

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 02:30:00.000000

``schema_compatibility`` holds one row per migration from this one on: the revision, the one
before it and the oldest release head whose code still runs on that schema. A worker or beat
whose head is older than the database's revision starts only if the row of the database's
revision serves it (orchestrator/preflight.py). Every later migration calls
``orchestrator.db.compatibility.declare`` last in its ``upgrade()`` and ``withdraw`` first in
its ``downgrade()`` (docs/operations.md, "Upgrades").

This revision only adds a table: the release at 0004 is served.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from orchestrator.db.compatibility import TABLE, declare

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("revision", sa.String(length=32), nullable=False),
        sa.Column("down_revision", sa.String(length=32)),
        sa.Column("oldest_served_revision", sa.String(length=32), nullable=False),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("revision", name=op.f(f"pk_{TABLE}")),
    )
    declare(revision, down_revision, oldest_served="0004")


def downgrade() -> None:
    op.drop_table(TABLE)
