"""The worker's Celery parts, each in its own module: the application class (:mod:`.app`), the
consumer that dead-letters what Celery would drop (:mod:`.consumer`), the heartbeat step and
beat scheduler (:mod:`.steps`), and the dispatcher the lifecycle hands work to
(:mod:`.dispatcher`). :mod:`orchestrator.celery_app` puts them together."""
