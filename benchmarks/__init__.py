"""Benchmarks of session-orchestrator against baselines measured in the same run.

Run them with ``make bench`` or ``python -m benchmarks.run [--only P1,P3] [--quick]``;
see ``benchmarks/README.md``.
"""
