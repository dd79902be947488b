"""The Celery wiring, each part in its own module: the tasks of the contract and the base
class they share (:mod:`.tasks`), the application class (:mod:`.app`), the consumer that
dead-letters what Celery would drop (:mod:`.consumer`), the heartbeat step and beat scheduler
(:mod:`.steps`), and the dispatcher the lifecycle hands work to (:mod:`.dispatcher`).
:mod:`.celery_app` puts them together; ``celery -A orchestrator`` loads
:mod:`orchestrator.celery`."""
