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
    # Only in cluster schedules ("k<seed>"): the broker is a three-node RabbitMQ cluster of the
    # run's own (tests/rabbit_cluster.py, quorum queues); one node killed with SIGKILL (never
    # while another is down), restarted at heal.
    "broker-node-kill": "broker-node",
}
DEFAULT_KINDS = tuple(kind for kind in FAULTS if kind not in ("pg-crash", "broker-node-kill"))
# Which node a broker-node-kill takes: the leader of ``orchestrator.start`` (found at the
# kill), or a node by its place in every process's failover list (node0 is everyone's first).
NODE_TARGETS = ("leader", "node0", "node1", "node2")
NODE_KILLS = 2  # per cluster schedule
NODE_REST = 12.0  # seconds between a node's heal and the next kill: its restart takes a while
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
    target: str = ""  # broker-node-kill only: one of NODE_TARGETS


@dataclass
class Schedule:
    seed: int
    length: float  # seconds of operations and faults; then everything is healed
    cap: int
    operations: list[Operation] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    cluster: bool = False  # the broker is a three-node cluster of the run's own

    @property
    def name(self) -> str:
        """The seed as ``make chaos SEED=…`` takes it (``c`` for a crash schedule, ``k`` for a
        cluster schedule)."""
        kinds = {f.kind for f in self.faults}
        prefix = "c" if "pg-crash" in kinds else ""
        prefix += "k" if self.cluster else ""
        return f"{prefix}{self.seed}"

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
    cluster: bool = False,
) -> Schedule:
    rng = random.Random(seed)
    schedule = Schedule(seed, length, cap, cluster=cluster)
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
    if cluster:  # its own random stream too
        _add_node_kills(schedule, random.Random(f"kill-{seed}"), length)
    schedule.faults.sort(key=lambda f: f.at)
    return schedule


def _add_node_kills(schedule: Schedule, rng: random.Random, length: float) -> None:
    """Up to NODE_KILLS node kills, one node down at a time, each after the previous node's
    restart had NODE_REST seconds."""
    free_from = 1.0
    for _ in range(NODE_KILLS):
        if free_from > length * 0.8:
            return
        at = round(rng.uniform(free_from, max(free_from, length * 0.8)), 2)
        heal_after = round(rng.uniform(2.0, 8.0), 2)
        schedule.faults.append(
            Fault(at, "broker-node-kill", heal_after, target=rng.choice(NODE_TARGETS))
        )
        free_from = at + heal_after + NODE_REST


def parse_seed(text: str) -> tuple[int, bool, bool]:
    """``"42"`` → (42, no crash, shared broker); ``"c42"`` → (42, with a Postgres crash,
    shared broker); ``"k42"`` → (42, no crash, on a three-node cluster with node kills);
    ``"ck42"`` → both."""
    digits = text.lstrip("ck")
    prefix = text[: len(text) - len(digits)]
    if not digits.isdigit() or len(set(prefix)) != len(prefix):
        raise ValueError(f"not a chaos seed: {text!r} (42, c42, k42 or ck42)")
    return int(digits), "c" in prefix, "k" in prefix
