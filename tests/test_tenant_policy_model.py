"""The tenant policy model, the shrinking of guarantees, and single decisions of ``choose``."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.tenants import (
    PolicyError,
    TenantPolicy,
    TenantState,
    choose,
    effective_guarantees,
    may_wait,
)

AGING = 400.0
HORIZON = 30.0


# --- the policy model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad Name"}, "name must match"),
        ({"guaranteed": -1}, "guaranteed must be"),
        ({"guaranteed": 3, "maximum": 2}, "maximum must be"),
        ({"maximum": 0}, "maximum must be"),
        ({"weight": 0}, "weight must be"),
        ({"weight": math.nan}, "weight must be"),
        ({"waiting_cap": -1}, "waiting cap must be"),
        ({"guaranteed": 2, "reserved": 3}, "reserved"),
        ({"guaranteed": True}, "guaranteed must be"),
    ],
)
def test_a_bad_policy_is_refused_in_one_line(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "acme", **kwargs}
    with pytest.raises(PolicyError, match=message) as caught:
        TenantPolicy(**args)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


def test_guarantees_shrink_in_proportion_below_their_sum() -> None:
    policies = {
        "a": TenantPolicy("a", guaranteed=6, reserved=6),
        "b": TenantPolicy("b", guaranteed=3, reserved=1),
        "c": TenantPolicy("c", guaranteed=1),
    }
    assert {n: g.guaranteed for n, g in effective_guarantees(20, policies).items()} == {
        "a": 6,
        "b": 3,
        "c": 1,
    }
    shrunk = effective_guarantees(5, policies)
    assert {n: g.guaranteed for n, g in shrunk.items()} == {"a": 3, "b": 2, "c": 0}
    assert {n: g.reserved for n, g in shrunk.items()} == {"a": 3, "b": 0, "c": 0}


@given(
    capacity=st.integers(0, 50),
    guarantees=st.lists(st.integers(0, 30), min_size=1, max_size=6),
)
def test_shrunk_guarantees_sum_to_the_capacity(capacity: int, guarantees: list[int]) -> None:
    policies = {f"t{i}": TenantPolicy(f"t{i}", guaranteed=g) for i, g in enumerate(guarantees)}
    shrunk = effective_guarantees(capacity, policies)
    total = sum(guarantees)
    if total <= capacity:
        assert all(g.guaranteed == policies[n].guaranteed for n, g in shrunk.items())
    else:
        assert sum(g.guaranteed for g in shrunk.values()) == capacity
        for n, g in shrunk.items():
            exact = policies[n].guaranteed * capacity / total
            assert math.floor(exact) <= g.guaranteed <= math.ceil(exact)


def test_no_slot_when_every_backlogged_tenant_is_at_its_maximum() -> None:
    policies = {"a": TenantPolicy("a", maximum=2)}
    states = {"a": TenantState(in_use=2, waiting=3, oldest_since=0.0)}
    assert choose(10, states, policies, 1.0, aging=AGING, horizon=HORIZON) is None


def test_an_idle_tenants_non_lendable_slots_are_kept() -> None:
    policies = {"gold": TenantPolicy("gold", guaranteed=3, reserved=2)}
    states = {"x": TenantState(in_use=3, waiting=5, oldest_since=0.0)}
    assert choose(5, states, policies, 1.0, aging=AGING, horizon=HORIZON) is None
    choice = choose(6, states, policies, 1.0, aging=AGING, horizon=HORIZON)
    assert choice is not None and choice.tenant == "x"


def test_a_full_pool_gives_no_slot_even_to_an_unfilled_reservation() -> None:
    """A reservation set while others hold every slot waits for the next end (no preemption)."""
    policies = {"gold": TenantPolicy("gold", guaranteed=2, reserved=2)}
    states = {
        "x": TenantState(in_use=4),
        "gold": TenantState(in_use=0, waiting=1, oldest_since=0.0),
    }
    assert choose(4, states, policies, 1.0, aging=AGING, horizon=HORIZON) is None
    choice = choose(5, states, policies, 1.0, aging=AGING, horizon=HORIZON)
    assert choice is not None and choice.tenant == "gold" and choice.reason == "reserved"


def test_the_waiting_cap_bounds_a_tenants_queue() -> None:
    capped = TenantPolicy("acme", waiting_cap=2)
    assert may_wait(capped, 1) and not may_wait(capped, 2)
    assert may_wait(TenantPolicy("free"), 10**6)
