"""Whose oldest waiting request gets the next free slot of the pool.

One pure function, :func:`choose`, called under the account's row lock with the usage rows
of the tenants it concerns. The order (docs/admission.md "Tenants"):

0. a slot kept free as an idle tenant's non-lendable guarantee goes to no one else;
1. a tenant below its non-lendable part, then a tenant below its guarantee, most below first;
2. never a tenant at its maximum;
3. a request that has waited at least ``aging`` seconds, oldest first;
4. the least weighted charge ``(used_seconds + in_use * horizon) / weight``;

ties by the oldest request, then by name. The caller admits the chosen tenant's oldest
request (first in first out within a tenant).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from orchestrator.tenants.policy import TenantPolicy, effective_guarantees, policy_for

Reason = Literal["reserved", "guarantee", "aged", "share"]


@dataclass(frozen=True, slots=True)
class TenantState:
    """One tenant's usage row, as admission reads it."""

    #: Live sessions (starting, active, stopping) across the pool.
    in_use: int = 0
    #: Requests waiting.
    waiting: int = 0
    #: Arrival time of its oldest waiting request (None when none waits).
    oldest_since: float | None = None
    #: Session-seconds used over the sliding window, live sessions counted up to now.
    used_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Choice:
    """The tenant whose oldest waiting request takes the slot, and the rule that chose it."""

    tenant: str
    reason: Reason


def charge(state: TenantState, policy: TenantPolicy, horizon: float) -> float:
    """The weighted charge fair sharing ranks by: each live session is charged ``horizon``
    seconds up front (its length is not known when it starts), on top of the seconds used."""
    return (state.used_seconds + state.in_use * horizon) / policy.weight


def choose(
    capacity: int,
    states: Mapping[str, TenantState],
    policies: Mapping[str, TenantPolicy],
    now: float,
    *,
    aging: float,
    horizon: float,
) -> Choice | None:
    """The tenant that gets the next free slot, or None when no slot may be given.

    ``states`` holds every tenant with sessions live or requests waiting; ``policies`` every
    configured tenant (the others have the default policy). None when the pool is full,
    when every backlogged tenant is at its maximum, or when the free slots are kept as the
    non-lendable guarantee of tenants that do not use them.
    """
    free = capacity - sum(s.in_use for s in states.values())
    if free <= 0:
        return None
    guarantees = effective_guarantees(capacity, policies)
    holes = {
        name: g.reserved - _in_use(states, name)
        for name, g in guarantees.items()
        if g.reserved > _in_use(states, name)
    }
    total_holes = sum(holes.values())
    best: tuple[tuple[float, ...], str, Reason] | None = None
    for name, state in states.items():
        if state.waiting <= 0 or state.oldest_since is None:
            continue
        policy = policy_for(policies, name)
        if policy.maximum is not None and state.in_use >= policy.maximum:
            continue
        own_hole = holes.get(name, 0)
        if own_hole == 0 and free - 1 < total_holes:
            continue  # the slot is kept for another tenant's non-lendable guarantee
        guaranteed = guarantees[name].guaranteed if name in guarantees else 0
        rank: tuple[float, ...]
        reason: Reason
        if own_hole > 0:
            rank, reason = (0, -own_hole, state.oldest_since), "reserved"
        elif state.in_use < guaranteed:
            rank, reason = (1, state.in_use - guaranteed, state.oldest_since), "guarantee"
        elif now - state.oldest_since >= aging:
            rank, reason = (2, state.oldest_since), "aged"
        else:
            rank = (3, charge(state, policy, horizon), state.oldest_since)
            reason = "share"
        if best is None or (rank, name) < (best[0], best[1]):
            best = (rank, name, reason)
    return None if best is None else Choice(best[1], best[2])


def _in_use(states: Mapping[str, TenantState], name: str) -> int:
    state = states.get(name)
    return 0 if state is None else state.in_use
