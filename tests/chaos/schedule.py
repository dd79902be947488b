"""Seeded schedules: a stream of starts, stops and expiries with mixed durations and more
requests at once than the cap, and faults on every boundary, each healed after a while.
The same seed gives the same schedule (times are offsets from the run's start).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

# A fault and the part it breaks; faults on one part never overlap.
FAULTS: dict[str, str] = {
    "kill-starter": "starter",  # SIGKILL the worker that runs starts (restarted at heal)
    "kill-steady": "steady",  # SIGKILL the worker running beat, reaper and reconciler
    "clock-jump": "starter",  # restart the start worker with its clock jumped (libfaketime)
    "pg-cut": "pg",  # every Postgres connection reset, new ones refused
    "pg-stall": "pg",  # Postgres connections open, nothing moves
    "pg-drop-reply": "pg",  # one UPDATE reaches Postgres, its reply is lost
    "broker-cut": "broker",
    "broker-stall": "broker",
    "vendor-cut": "vendor-net",
    "vendor-stall": "vendor-net",
    "vendor-drop-reply": "vendor-net",  # one start reaches the vendor, its reply is lost
    "vendor-latency": "vendor",  # the simulator answers slowly (start 2.5 s, stop 1.5 s)
    "vendor-errors": "vendor",  # the simulator fails half the start, stop and list calls
    # Only in crash schedules ("c<seed>"): the service's Postgres (a server of the run's own,
    # tests/faults/crashable_postgres.py) killed with SIGKILL, restarted at heal (recovery).
    "pg-crash": "pg",
}
DEFAULT_KINDS = tuple(kind for kind in FAULTS if kind != "pg-crash")
DURATIONS = (3, 6, 12, None)  # max_duration_seconds of a start (None: the default, long)


@dataclass(frozen=True)
class Operation:
    at: float
    kind: str  # start | stop
    request_id: str
    max_duration_seconds: int | None = None


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    heal_after: float
    offset_seconds: int = 0  # clock-jump only


@dataclass
class Schedule:
    seed: int
    length: float  # seconds of operations and faults; then everything is healed
    cap: int
    operations: list[Operation] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The seed as ``make chaos SEED=…`` takes it (``c`` for a crash schedule)."""
        crash = any(f.kind == "pg-crash" for f in self.faults)
        return f"c{self.seed}" if crash else str(self.seed)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate(
    seed: int,
    *,
    length: float = 30.0,
    starts: int = 20,
    faults: int = 4,
    cap: int = 5,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    crash: bool = False,
) -> Schedule:
    rng = random.Random(seed)
    schedule = Schedule(seed, length, cap)
    for i in range(starts):
        at = round(rng.uniform(0, length * 0.8), 2)
        rid = f"chaos-{seed}-{i}"
        duration = rng.choice(DURATIONS)
        schedule.operations.append(Operation(at, "start", rid, duration))
        if rng.random() < 0.3:  # some are stopped by the user, some before they start
            stop_at = round(at + rng.uniform(-0.5, 8.0), 2)
            schedule.operations.append(Operation(max(0.0, stop_at), "stop", rid))
    schedule.operations.sort(key=lambda op: op.at)
    busy: dict[str, list[tuple[float, float]]] = {}
    for _ in range(faults * 4):
        if len(schedule.faults) >= faults:
            break
        kind = rng.choice(kinds)
        part = FAULTS[kind]
        at = round(rng.uniform(1.0, length * 0.85), 2)
        heal_after = round(rng.uniform(1.0, 8.0), 2)
        end = at + heal_after + 2.0  # a restarted worker needs a moment
        if any(at < b and a < end for a, b in busy.get(part, [])):
            continue
        offset = rng.choice((-45, -20, 20, 45, 300)) if kind == "clock-jump" else 0
        schedule.faults.append(Fault(at, kind, heal_after, offset))
        busy.setdefault(part, []).append((at, end))
    if crash:  # its own random stream: the rest of the schedule is the plain seed's
        crash_rng = random.Random(f"crash-{seed}")
        for _ in range(20):
            at = round(crash_rng.uniform(2.0, length * 0.8), 2)
            end = at + 6.0
            if not any(at < b and a < end for a, b in busy.get("pg", [])):
                heal_after = round(crash_rng.uniform(1.0, 4.0), 2)
                schedule.faults.append(Fault(at, "pg-crash", heal_after))
                break
    schedule.faults.sort(key=lambda f: f.at)
    return schedule


def parse_seed(text: str) -> tuple[int, bool]:
    """``"42"`` → (42, no crash); ``"c42"`` → (42, with a Postgres crash)."""
    crash = text.startswith("c")
    return int(text.removeprefix("c")), crash
