"""Call counters per endpoint and per account (``GET /_sim/stats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.simulator.endpoint_values import ENDPOINTS


@dataclass
class EndpointStats:
    calls: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    faults_applied: int = 0
    random_failures: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "statuses": dict(self.statuses),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "faults_applied": self.faults_applied,
            "random_failures": self.random_failures,
        }


class CallStats:
    """Counters of every vendor request, and of each account's requests."""

    def __init__(self) -> None:
        self.endpoints = {name: EndpointStats() for name in ENDPOINTS}
        #: account -> endpoint -> HTTP status (or "dropped", ...) -> count
        self.by_account: dict[str, dict[str, dict[str, int]]] = {}
        self.stop_calls_unknown: dict[str, int] = {}

    def begin(self, endpoint: str) -> None:
        stats = self.endpoints[endpoint]
        stats.calls += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)

    def end(self, endpoint: str, status: int | str) -> None:
        stats = self.endpoints[endpoint]
        stats.in_flight -= 1
        key = str(status)
        stats.statuses[key] = stats.statuses.get(key, 0) + 1

    def account_call(self, account: str, endpoint: str, status: int | str) -> None:
        statuses = self.by_account.setdefault(account, {}).setdefault(endpoint, {})
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    def account_view(self, account: str) -> dict[str, Any]:
        calls = self.by_account.get(account, {})
        return {
            "calls": {name: sum(by_status.values()) for name, by_status in calls.items()},
            "statuses": {name: dict(by_status) for name, by_status in calls.items()},
        }
