"""The one backoff formula: capped exponential, jittered. Every retry of the service waits by
it — the vendor client's retries, a task waiting out the database, a start's record, a
failing vendor stop."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

Jitter = Literal["equal", "full", "none"]


def exponential_backoff(
    attempt: int,
    *,
    base: float,
    cap: float,
    jitter: Jitter = "equal",
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry ``attempt`` (1 after the first failure).

    The ceiling is ``min(cap, base * 2 ** (attempt - 1))``. ``"equal"`` jitter waits between
    half the ceiling and all of it (callers still spread out, none retries at once),
    ``"full"`` anywhere from 0 to the ceiling, ``"none"`` exactly the ceiling (tests).
    """
    ceiling = min(cap, base * 2.0 ** max(0, attempt - 1))
    if jitter == "full":
        return ceiling * rand()
    if jitter == "equal":
        return ceiling / 2 + ceiling / 2 * rand()
    return ceiling
