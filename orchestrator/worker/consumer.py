"""The consumer: rejects into ``orchestrator.dead`` what Celery would ack and drop, and never
logs message bodies (they may carry the customer's LLM keys)."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.worker.consumer import Consumer

logger = logging.getLogger(__name__)


def _malformed_body(message: Any) -> str | None:
    """Why a JSON task body is not Celery's ``[args, kwargs, embed]``, or None if it is.

    Celery itself acks a task whose kwargs are not a mapping as if it had succeeded.
    Bodies that do not decode are left to Celery, which calls ``on_decode_error``.
    """
    try:
        body = message.decode()
    except Exception:  # noqa: BLE001 - the handler's own decode path reports these
        return None
    if not isinstance(body, list | tuple) or len(body) != 3:
        return "the body is not a 3-element list [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return "args (the body's first element) is not a list"
    if not isinstance(kwargs, dict):
        return "kwargs (the body's second element) is not an object"
    if embed is not None and not isinstance(embed, dict):
        return "embed (the body's third element) is not an object"
    return None


class DeadLetteringConsumer(Consumer):
    """Rejects (into ``orchestrator.dead``) what Celery would ack and drop, and never logs
    message bodies: they may carry the customer's LLM keys."""

    @property
    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        errors: tuple[type[BaseException], ...] = getattr(self, "connection_errors", ())
        return errors

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler raises on a body that is not its 3-element list or a message with
        no ``id`` header, and that takes the whole worker down (then the next one: a crash
        loop). Such a message is dead-lettered instead."""
        handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            problem = _malformed_body(message)
            if problem is not None:
                logger.error("malformed task message dead-lettered: %s", problem)
                message.reject_log_error(logger, self._connection_errors, requeue=False)
                return None
            try:
                return handler(message)
            except Exception as exc:  # noqa: BLE001 - any malformed message, one outcome
                logger.error(
                    "malformed task message dead-lettered (task %r): %s",
                    (message.headers or {}).get("task"),
                    type(exc).__name__,
                )
                try:
                    message.reject_log_error(logger, self._connection_errors, requeue=False)
                except Exception:  # already acknowledged or rejected: nothing more to do
                    logger.warning("could not reject the malformed message", exc_info=True)
                return None

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        logger.error(
            "undecodable message dead-lettered (content type %r): %s",
            message.content_type,
            type(exc).__name__,
        )
        message.reject_log_error(logger, self._connection_errors, requeue=False)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        logger.error("message for unknown task %r dead-lettered", message.headers.get("task"))
        message.reject_log_error(logger, self._connection_errors, requeue=False)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        logger.error("invalid task message dead-lettered: %s", exc)
        message.reject_log_error(logger, self._connection_errors, requeue=False)
        signals.task_rejected.send(sender=self, message=message, exc=exc)
