"""When a failed delivery is tried again: the specification's example schedule (immediately,
5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h), each wait jittered, never shorter than
the receiver's ``Retry-After``; after the last attempt the delivery is given up."""

from __future__ import annotations

import random
from collections.abc import Callable

from orchestrator.deepbrain.errors import parse_retry_after

# SCHEDULE[n]: seconds before attempt n+1, once n attempts failed; attempt 1 goes at once.
SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)
ATTEMPTS = len(SCHEDULE)
JITTER = 0.2  # each wait is drawn from ±20 % of its step
RETRY_AFTER_CAP = 86_400.0  # a receiver cannot push one retry further than a day


def next_delay(
    attempts: int, retry_after: str | None = None, rand: Callable[[], float] = random.random
) -> float | None:
    """Seconds until the next attempt after ``attempts`` attempts failed; None: give up."""
    if attempts >= ATTEMPTS:
        return None
    step = SCHEDULE[attempts]
    delay = step * (1 - JITTER + 2 * JITTER * rand())
    asked = parse_retry_after(retry_after)
    if asked is not None:
        delay = max(delay, min(asked, RETRY_AFTER_CAP))
    return delay
