"""One retry loop for every DeepBrain endpoint: capped, jittered exponential backoff.

The delay before retry ``n`` (n = 1 after the first failure) is built from
``cap = min(max_delay, base_delay * 2 ** (n - 1))`` and the jitter strategy:

* ``"equal"`` (default): ``cap / 2 + uniform(0, cap / 2)`` — never less than half the cap, so
  a burst of callers still spreads out but no one retries at once;
* ``"full"``: ``uniform(0, cap)`` (AWS "full jitter");
* ``"none"``: ``cap`` (deterministic; for tests).

When the failure carries ``Retry-After``, the delay is ``max(Retry-After, backoff)``; a
``Retry-After`` longer than ``max_retry_after`` ends the call at once (the error is raised with
``retry_after_seconds`` set, so the caller can reschedule). Only errors with
``retryable=True`` are retried, at most ``max_attempts`` attempts in all.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from orchestrator.backoff import exponential_backoff
from orchestrator.deepbrain.errors import DeepBrainError

__all__ = ["RetryPolicy", "call_with_retry"]

logger = logging.getLogger("orchestrator.deepbrain")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a failed vendor call (see the module docstring)."""

    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    jitter: Literal["equal", "full", "none"] = "equal"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if min(self.base_delay, self.max_delay, self.max_retry_after) < 0:
            raise ValueError("RetryPolicy delays must not be negative")
        if self.jitter not in ("equal", "full", "none"):
            raise ValueError("RetryPolicy.jitter must be 'equal', 'full' or 'none'")

    def backoff(self, retry_number: int, rand: Callable[[], float] = random.random) -> float:
        """Jittered delay before retry ``retry_number`` (1-based)."""
        return exponential_backoff(
            retry_number, base=self.base_delay, cap=self.max_delay, jitter=self.jitter, rand=rand
        )

    def delay_for(self, retry_number: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry ``retry_number``; None when Retry-After is too long."""
        if retry_after is not None and retry_after > self.max_retry_after:
            return None
        return max(retry_after or 0.0, self.backoff(retry_number))


def call_with_retry(
    attempt: Callable[[], T],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], None],
    endpoint: str,
    deadline: float | None = None,
    attempt_seconds: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``attempt`` until it returns, retrying retryable :class:`DeepBrainError` failures.

    With ``deadline`` (a ``clock`` reading), no retry starts that could not end before it:
    the wait plus ``attempt_seconds`` (one attempt's worst case) must fit. The error finally
    raised has ``attempts`` set to the number of attempts made.
    """
    number = 0
    while True:
        number += 1
        try:
            return attempt()
        except DeepBrainError as exc:
            exc.attempts = number
            if not exc.retryable or number >= policy.max_attempts:
                raise
            delay = policy.delay_for(number, exc.retry_after_seconds)
            if delay is None:
                logger.warning(
                    "deepbrain %s: giving up, Retry-After %.1fs exceeds the %.1fs limit (%s)",
                    endpoint,
                    exc.retry_after_seconds,
                    policy.max_retry_after,
                    exc.error_code,
                    extra=_log_fields(exc, number, None),
                )
                raise
            if deadline is not None and clock() + delay + attempt_seconds > deadline:
                logger.warning(
                    "deepbrain %s: giving up after attempt %d, another could not finish before"
                    " the deadline (%s)",
                    endpoint,
                    number,
                    exc.error_code,
                    extra=_log_fields(exc, number, None),
                )
                raise
            logger.info(
                "deepbrain %s: attempt %d/%d failed (%s%s%s), retrying in %.2fs",
                endpoint,
                number,
                policy.max_attempts,
                exc.error_code,
                f", HTTP {exc.http_status}" if exc.http_status is not None else "",
                f", at {exc.endpoint}" if exc.endpoint != endpoint else "",
                delay,
                extra=_log_fields(exc, number, delay),
            )
            sleep(delay)


def _log_fields(exc: DeepBrainError, attempt: int, delay: float | None) -> dict[str, object]:
    return {
        "vendor_endpoint": exc.endpoint,
        "vendor_attempt": attempt,
        "vendor_http_status": exc.http_status,
        "vendor_code": exc.code,
        "vendor_error_code": exc.error_code,
        "retry_delay_seconds": delay,
    }
