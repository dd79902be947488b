"""The fault suite's fixtures (tests/faults/conftest.py), shared with the chaos schedules."""

from tests.faults.conftest import big_vendor, clean_queues, fault_settings

__all__ = ["big_vendor", "clean_queues", "fault_settings"]
