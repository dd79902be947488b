"""Webhooks: the lifecycle events over HTTP, per the Standard Webhooks specification, fed from
the same outbox as the exchange (docs/messages.md, "Webhooks"; docs/operations.md).

- :mod:`.models`: endpoints, their encrypted signing secrets, deliveries, attempts;
- :mod:`.settings`: ``ORCHESTRATOR_WEBHOOK_*``;
- :mod:`.secrets`, :mod:`.signing`, :mod:`.payload`: what a request carries;
- :mod:`.addresses`, :mod:`.transport`: where a request may go, and going only there;
- :mod:`.deliveries`: outbox → deliveries, and the claim of due ones (order, bounds);
- :mod:`.attempt`, :mod:`.schedule`, :mod:`.outcomes`, :mod:`.disabling`: one try, the next;
- :mod:`.sender`: the loop of ``orchestrator webhooks send``;
- :mod:`.endpoints`: what the CLI changes.
"""
