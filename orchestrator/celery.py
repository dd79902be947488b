"""The application for Celery's own tools, built from the environment (``ORCHESTRATOR_*``), so
they work against a running deployment::

    celery -A orchestrator inspect ping          # or -A orchestrator.celery
    celery -A orchestrator inspect active
    celery -A orchestrator purge -Q orchestrator.start
    celery -A orchestrator events                 # needs `orchestrator worker --events`
    celery -A orchestrator flower                 # pip install flower

It is the worker's application (the same broker, queues, serializer and task names), built
lazily: importing it opens no connection and starts no database. Run workers and beat with
``orchestrator worker`` / ``orchestrator beat``, which also check the settings and declare the
broker topology first.
"""

from __future__ import annotations

from orchestrator.config import load_settings
from orchestrator.worker.celery_app import create_app

app = create_app(load_settings())
