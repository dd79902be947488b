"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from orchestrator.db.compatibility import declare, withdraw
${imports if imports else ""}
revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


# Expand only (docs/operations.md, "Upgrades"): what the previous release uses stays. A contract
# step lists what it drops or changes in REMOVES and raises oldest_served past its users.
REMOVES: dict[str, str] = {}


def upgrade() -> None:
    ${upgrades if upgrades else "# what this release adds"}
    # The oldest release head this schema serves: at least the previous revision (an expansion
    # may keep the previous row's older value).
    declare(revision, down_revision, oldest_served=${repr(down_revision)})


def downgrade() -> None:
    withdraw(revision)
    ${downgrades if downgrades else "# undo it"}
