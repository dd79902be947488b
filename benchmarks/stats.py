"""Percentiles and rates, with no numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values_s: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99/max in milliseconds of durations given in seconds."""
    ms = [v * 1000.0 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else math.nan,
    }


def steady_rate(times: Sequence[float], low: float = 0.1, high: float = 0.9) -> float:
    """Completions per second between the ``low`` and ``high`` fractions of all completions:
    leaves out the ramp-up (worker filling its threads) and the drain at the end."""
    ordered = sorted(times)
    if len(ordered) < 10:
        return math.nan
    i = int(len(ordered) * low)
    j = int(len(ordered) * high) - 1
    span = ordered[j] - ordered[i]
    return (j - i) / span if span > 0 else math.nan


def drain_rate(times: Sequence[float], ready_at: float | None) -> float:
    """Completions per second over the whole drain: from the worker being ready (the queue
    was filled before) to the last completion, ramp-up and tail included."""
    if not times or ready_at is None:
        return math.nan
    span = max(times) - ready_at
    return len(times) / span if span > 0 else math.nan


def ratio(value: float, baseline: float) -> float:
    return round(value / baseline, 3) if baseline and not math.isnan(baseline) else math.nan
