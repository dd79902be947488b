"""Endpoint names and the ``"start=0.1,stop=0.05"`` form of per-endpoint numbers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

#: Endpoint names used by per-endpoint knobs, scripted faults and stats.
ENDPOINTS: Final[tuple[str, ...]] = ("token", "start", "stop", "ping", "talk", "list", "detail")


def _spec_items(spec: str | Mapping[str, Any] | Iterable[str]) -> list[tuple[str, Any]]:
    if isinstance(spec, Mapping):
        return list(spec.items())
    parts = [spec] if isinstance(spec, str) else list(spec)
    items: list[tuple[str, Any]] = []
    for part in parts:
        for raw in str(part).split(","):
            entry = raw.strip()
            if not entry:
                continue
            name, sep, value = entry.partition("=")
            items.append((name.strip(), value.strip()) if sep else ("*", entry))
    return items


def parse_endpoint_values(
    spec: str | Mapping[str, Any] | Iterable[str] | None,
) -> dict[str, float]:
    """Parse per-endpoint numbers, e.g. ``"start=0.1,stop=0.05"``.

    Accepts a mapping, a comma separated string, or an iterable of such strings
    (a repeated CLI option). ``*=0.1`` or a bare ``0.1`` applies to every
    endpoint; later entries override earlier ones. Raises ``ValueError`` naming
    the bad part.
    """
    result: dict[str, float] = {}
    for name, value in _spec_items(spec) if spec is not None else []:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number):
            raise ValueError(f"{name}={value!r}: not a number")
        if name == "*":
            result.update(dict.fromkeys(ENDPOINTS, number))
        elif name in ENDPOINTS:
            result[name] = number
        else:
            raise ValueError(f"unknown endpoint {name!r} (expected one of {', '.join(ENDPOINTS)})")
    return result


def check_rates_and_delays(
    owner: str, failure_rate: Mapping[str, float], endpoint_latency: Mapping[str, float]
) -> None:
    """ValueError unless every rate is a probability and every delay is >= 0."""
    for name, rate in failure_rate.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{owner}failure_rate for {name} must be between 0 and 1, got {rate}")
    for name, delay in endpoint_latency.items():
        if delay < 0:
            raise ValueError(f"{owner}endpoint_latency for {name} must be >= 0, got {delay}")
