"""``orchestrator tenants`` and ``tenants set``: a policy set by the CLI is what the next claim
applies (no restart), a bad value is one line naming the field, and the table and ``--json``
show each tenant's policy beside its usage."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.lifecycle import Lifecycle, handle_start_message
from tests.conftest import settings_env
from tests.helpers import row

pytestmark = pytest.mark.postgres


def run(settings: Settings, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=settings_env(settings))
    return result.exit_code, result.output


def test_a_policy_set_by_the_cli_applies_at_the_next_claim(
    settings_for: Callable[..., Settings], lifecycle: Lifecycle, db: Database
) -> None:
    settings = settings_for()
    code, out = run(settings, "tenants", "set", "acme", "--guaranteed", "1", "--max", "1")
    assert code == 0, out
    assert out.strip() == "tenant acme: guaranteed 1 (reserved 0), max 1, weight 1, max waiting -"
    for i in range(2):
        handle_start_message(
            lifecycle,
            (),
            {"avatar_id": "a", "request_id": f"t{i}", "tenant": "acme"},
            claim_id=f"c{i}",
        )
    assert (row(db, "t0").status, row(db, "t0").tenant) == ("active", "acme")
    assert row(db, "t1").status == "waiting"  # acme is at its maximum

    code, out = run(settings, "tenants", "--json")
    assert code == 0, out
    (acme,) = [t for t in json.loads(out) if t["tenant"] == "acme"]
    assert (acme["maximum"], acme["in_use"], acme["waiting"], acme["configured"]) == (1, 1, 1, True)
    assert acme["oldest_waiting_at"]

    code, out = run(settings, "tenants")
    assert code == 0, out
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["tenant", "guaranteed", "reserved"]
    assert any(line.split() == ["acme", "1", "0", "1", "1", "-", "1", "1"] for line in lines)

    code, out = run(settings, "tenants", "set", "acme", "--guaranteed", "3", "--max", "2")
    assert code == 1
    assert out.strip() == (
        "Error: tenant 'acme': maximum must be a whole number from max(guaranteed, 1)"
        " to 1000000, or none"
    )
