"""Who was just admitted from waiting, and how long each waited: for the per-tenant metrics
(``lifecycle.metrics.record_admitted``). Read after the admission committed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import text

from orchestrator.db import Database

_WAITS = text(
    "SELECT tenant, extract(epoch FROM coalesce(admitted_at, now()) - created_at) AS waited"
    " FROM sessions WHERE id = ANY(:ids)"
)


def admitted_waits(db: Database, ids: Sequence[uuid.UUID]) -> list[tuple[str, float]]:
    """(tenant, seconds from arrival to admission) of each admitted row."""
    if not ids:
        return []
    with db.transaction() as session:
        return [(r.tenant, float(r.waited)) for r in session.execute(_WAITS, {"ids": list(ids)})]
