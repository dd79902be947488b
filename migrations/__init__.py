"""Alembic migrations, shipped inside the package as ``orchestrator.migrations``."""
