"""``python -m benchmarks.tenants_estimate [RUNS]``: the cost of the tenants' pure functions at
the scale of the tenants issue, with no database: the wait estimate for 10,000 waiting requests
of 1,000 tenants on a pool of 100 slots (``RUNS`` Monte Carlo runs, 48 by default), and one
admission choice over those 1,000 tenants. Prints one JSON line: wall and CPU seconds.
"""

from __future__ import annotations

import json
import random
import sys
import time

from orchestrator.tenants import (
    LiveSession,
    Pool,
    TenantPolicy,
    TenantState,
    Waiter,
    choose,
    estimate_waits,
)

TENANTS, WAITERS, CAPACITY = 1_000, 10_000, 100


def pool(rng: random.Random) -> Pool:
    now = 10_000.0
    names = [f"t{i}" for i in range(TENANTS)]
    policies = {
        n: TenantPolicy(
            n,
            guaranteed=1 if i < 20 else 0,
            maximum=5 if i % 3 == 0 else None,
            weight=rng.choice([1.0, 2.0, 5.0]),
        )
        for i, n in enumerate(names)
    }
    return Pool(
        capacity=CAPACITY,
        live=[
            LiveSession(rng.choice(names), now - rng.uniform(0, 600), now + rng.uniform(1, 1200))
            for _ in range(CAPACITY)
        ],
        waiters=[
            Waiter(f"r{i}", rng.choice(names), now - rng.uniform(0, 900)) for i in range(WAITERS)
        ],
        policies=policies,
        durations={n: [rng.lognormvariate(5, 0.8) for _ in range(50)] for n in names},
        now=now,
        max_duration=1800.0,
        usage={n: rng.uniform(0, 10_000) for n in names},
        arrival_rates=dict.fromkeys(names[:20], 0.01),
    )


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 48
    rng = random.Random(1)
    p = pool(rng)
    wall, cpu = time.perf_counter(), time.process_time()
    estimate_waits(p, aging=1800.0, horizon=300.0, runs=runs)
    estimate = (time.perf_counter() - wall, time.process_time() - cpu)
    states = {t: TenantState(in_use=0, waiting=10, oldest_since=0.0) for t in p.policies}
    wall = time.perf_counter()
    for _ in range(100):
        choose(CAPACITY, states, p.policies, p.now, aging=1800.0, horizon=300.0)
    choice = (time.perf_counter() - wall) / 100
    print(
        json.dumps(
            {
                "waiters": WAITERS,
                "tenants": TENANTS,
                "capacity": CAPACITY,
                "runs": runs,
                "estimate_wall_s": round(estimate[0], 3),
                "estimate_cpu_s": round(estimate[1], 3),
                "choice_ms": round(choice * 1000, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
