"""A tenant's admission policy: guaranteed slots (part of them optionally not lendable), a
maximum, a weight for fair sharing, and a cap on its waiting requests.

Pure data and validation; policies live in the database and are set with the CLI (the
wiring). A bad value is a :class:`PolicyError` whose message is one line.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

TENANT_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
DEFAULT_TENANT: Final = "default"
#: Bounds that keep arithmetic and the admin views sane (a pool is at most this many slots).
MAX_SLOTS: Final = 1_000_000
MAX_WEIGHT: Final = 1_000_000.0


class PolicyError(ValueError):
    """A tenant policy that cannot be used; the message is one line naming the field."""


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What one tenant is promised and allowed, counted across the whole pool of accounts."""

    name: str
    #: Slots the tenant gets back first when it wants them (shrunk in proportion when the
    #: pool's capacity is below the sum of guarantees).
    guaranteed: int = 0
    #: Most slots the tenant holds at once; None: only the capacity limits it.
    maximum: int | None = None
    #: Share of the slots left after guarantees, relative to other tenants' weights.
    weight: float = 1.0
    #: Most requests the tenant may have waiting; None: no cap of its own.
    waiting_cap: int | None = None
    #: The part of ``guaranteed`` kept free for the tenant even while it is idle (never lent).
    reserved: int = 0

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise PolicyError(f"tenant {self.name!r}: {problem}")


def _problem(p: TenantPolicy) -> str | None:  # noqa: PLR0911 (one return per rule reads best)
    if not isinstance(p.name, str) or not TENANT_NAME.fullmatch(p.name):
        return f"name must match {TENANT_NAME.pattern}"
    if not _int_in(p.guaranteed, 0, MAX_SLOTS):
        return f"guaranteed must be a whole number from 0 to {MAX_SLOTS}"
    if p.maximum is not None and not _int_in(p.maximum, max(p.guaranteed, 1), MAX_SLOTS):
        return f"maximum must be a whole number from max(guaranteed, 1) to {MAX_SLOTS}, or none"
    if (
        isinstance(p.weight, bool)
        or not isinstance(p.weight, int | float)
        or not math.isfinite(p.weight)
        or not 0 < p.weight <= MAX_WEIGHT
    ):
        return f"weight must be a number above 0 and at most {MAX_WEIGHT:g}"
    if p.waiting_cap is not None and not _int_in(p.waiting_cap, 0, 10 * MAX_SLOTS):
        return "waiting cap must be a whole number from 0, or none"
    if not _int_in(p.reserved, 0, p.guaranteed):
        return "reserved (not lendable) must be a whole number from 0 to guaranteed"
    return None


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@functools.lru_cache(maxsize=4096)
def default_policy(name: str = DEFAULT_TENANT) -> TenantPolicy:
    """The policy of a tenant nobody configured: no guarantee, no maximum, weight 1. Cached
    (a policy is frozen): a decision over a thousand unconfigured tenants built and checked
    one each time."""
    return TenantPolicy(name=name)


def policy_for(policies: Mapping[str, TenantPolicy], tenant: str) -> TenantPolicy:
    """The tenant's policy, or the default one when it has none."""
    found = policies.get(tenant)
    return found if found is not None else default_policy(tenant)


def may_wait(policy: TenantPolicy, waiting: int) -> bool:
    """Whether one more request of the tenant may wait (its waiting cap, if it has one)."""
    return policy.waiting_cap is None or waiting < policy.waiting_cap


@dataclass(frozen=True, slots=True)
class Guarantee:
    """A tenant's guarantee as the current capacity can honour it."""

    guaranteed: int
    reserved: int


def effective_guarantees(
    capacity: int, policies: Mapping[str, TenantPolicy]
) -> dict[str, Guarantee]:
    """Guarantees the pool's ``capacity`` can honour (tenants with a guarantee only).

    While the capacity covers the sum of guarantees they stand as configured. Below it,
    every guarantee shrinks in the same proportion ``capacity / Σ guaranteed``: rounded
    down, the slots left by rounding go to the largest remainders (ties by name), so the
    shrunk guarantees sum to the capacity. A reservation shrinks by the same factor,
    rounded down (never above the shrunk guarantee).
    """
    wanted = {name: p for name, p in policies.items() if p.guaranteed > 0}
    total = sum(p.guaranteed for p in wanted.values())
    capacity = max(0, capacity)
    if total <= capacity:
        return {n: Guarantee(p.guaranteed, p.reserved) for n, p in wanted.items()}
    shares = {n: p.guaranteed * capacity / total for n, p in wanted.items()}
    floors = {n: math.floor(s) for n, s in shares.items()}
    left = capacity - sum(floors.values())
    for name in sorted(shares, key=lambda n: (floors[n] - shares[n], n))[:left]:
        floors[name] += 1
    return {
        n: Guarantee(floors[n], min(floors[n], math.floor(p.reserved * capacity / total)))
        for n, p in wanted.items()
    }
