"""Lifecycle events out: ``session.active``, ``session.ended`` and ``session.failed`` on the
``orchestrator.events`` exchange.

- :mod:`.bodies`: what an event is (its JSON body and routing key);
- :mod:`.outbox`: an event is a row of ``event_outbox`` first, written in the transaction of
  the transition it reports, so a rollback sends nothing;
- :mod:`.relay`: after the commit, unpublished rows are read in order and handed to
- :mod:`.publisher`: persistent messages with publisher confirms. At least once: consumers
  de-duplicate on ``event_id``.
"""
