"""``python -m orchestrator.simulator`` — serve the simulator without the click CLI.

Options mirror ``SimulatorConfig`` (see ``--help``); ``orchestrator simulator``
is the supported entry point, this one needs nothing but the package.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator.simulator.config import SimulatorConfig
from orchestrator.simulator.server import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--latency", type=float, help="seconds added to every request")
    parser.add_argument(
        "--endpoint-latency", action="append", help="per endpoint, e.g. start=1,stop=0.2"
    )
    parser.add_argument(
        "--failure-rate", action="append", help="500/5000 probability, e.g. start=0.1,stop=0.05"
    )
    parser.add_argument("--max-concurrent-sessions", type=int)
    parser.add_argument("--idle-timeout", help="seconds, or 'none' to disable")
    parser.add_argument("--token-ttl", type=float)
    parser.add_argument("--plan-max-minutes", type=int)
    parser.add_argument("--seconds-per-minute", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--app-id")
    parser.add_argument("--user-key")
    parser.add_argument(
        "--accounts-file", help="JSON list of accounts (serves them instead of --app-id/--user-key)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = SimulatorConfig.from_options(
            latency=args.latency,
            endpoint_latency=args.endpoint_latency,
            failure_rate=args.failure_rate,
            max_concurrent_sessions=args.max_concurrent_sessions,
            idle_timeout=args.idle_timeout,
            token_ttl=args.token_ttl,
            plan_max_minutes=args.plan_max_minutes,
            seconds_per_minute=args.seconds_per_minute,
            seed=args.seed,
            app_id=args.app_id,
            user_key=args.user_key,
            accounts_file=args.accounts_file,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run(config, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
