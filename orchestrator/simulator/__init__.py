"""A fake DeepBrain AI Streamer API (aiohttp), written from the vendor's API documentation
only (its replies as a schema: tests/hostile/schema.py).

It shares no code with the orchestrator's DeepBrain client, so a test of one
against the other proves something. Vendor endpoints live under
``/api/v2/sessions``; the test/admin API (not part of DeepBrain) under ``/_sim/``.

    from orchestrator.simulator import SimulatorConfig, SimulatorServer
    with SimulatorServer(SimulatorConfig(max_concurrent_sessions=3)) as sim:
        ...  # point the client at sim.base_url

Several accounts, each with its own keys, cap, sessions and faults::

    SimulatorConfig(accounts=[SimulatorAccount("eu", "eu-app", "eu-key", 2), ...])
"""

from orchestrator.simulator.accounts import SimulatorAccount, load_accounts_file
from orchestrator.simulator.app import create_app
from orchestrator.simulator.config import (
    ENDPOINTS,
    Fault,
    SimulatorConfig,
    default_code_for_status,
    parse_endpoint_values,
)
from orchestrator.simulator.server import SimulatorServer, run
from orchestrator.simulator.state import SimulatorState

__all__ = [
    "ENDPOINTS",
    "Fault",
    "SimulatorAccount",
    "SimulatorConfig",
    "SimulatorServer",
    "SimulatorState",
    "create_app",
    "default_code_for_status",
    "load_accounts_file",
    "parse_endpoint_values",
    "run",
]
