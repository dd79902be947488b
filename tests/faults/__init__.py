"""Fault and bad-input suite (issue 7): kills, outages, vendor faults, malformed messages,
secrets. Every test here is marked ``faults``; run it alone with ``pytest -m faults``."""
