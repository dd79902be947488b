"""One logging set-up for every command: JSON lines for machines, text for a terminal.

Each line carries the current span's ``trace_id`` and ``span_id`` (when one is recording)
and the ``extra=`` fields of the call (JSON: as keys; text: ``key=value`` at the end). Times
are UTC, ISO 8601 with ``Z``. Nothing in this code base logs a secret; as a last line of
defence, a field whose name says it is secret is masked, and so is anything shaped like a JWT
(session and LiveKit tokens) in a message. One extra is never written: Celery's ``data``, the
task's context it passes along for custom handlers, which holds the task's arguments (a
start's may carry the customer's LLM keys).
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["auto", "text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
MASK = "***"
# Field names whose values are secrets: masked whatever the value.
SECRET_FIELD = re.compile(
    r"token|secret|password|passwd|user_?key|app_?id|api_?key|authorization|cookie|credential",
    re.IGNORECASE,
)
# A JWT: three base64url parts, the first a JSON header ("eyJ").
JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_OURS = frozenset({"trace_id", "span_id"})
# Celery logs each task event with extra={"data": context}: its args and kwargs included.
_CELERY_CONTEXT = "data"


def utc_timestamp(created: float) -> str:
    """A record's time as ISO 8601 in UTC with milliseconds and ``Z``."""
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class SafeRecordFilter(logging.Filter):
    """Adds the trace context, masks secret-named fields and JWT-shaped text. A handler
    filter, so it sees the records of every logger (ours, Celery's, the libraries')."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = f"{context.trace_id:032x}"
            record.span_id = f"{context.span_id:016x}"
        message = record.getMessage()
        masked = JWT.sub(MASK, message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        for key, value in extra_fields(record).items():
            if key == _CELERY_CONTEXT and isinstance(value, dict):
                delattr(record, key)
            elif key not in _OURS and SECRET_FIELD.search(key):
                setattr(record, key, MASK)
        return True


class TextFormatter(logging.Formatter):
    """The classic line, UTC, with the extra fields and the trace context appended."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_timestamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = extra_fields(record)
        if not extras:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the line
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{head} {tail}{newline}{rest}"


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: timestamp, level, logger, process, message, trace_id,
    span_id, the extra fields, and ``exc_info`` (the traceback as one string) if any."""

    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{processName}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger", "processName": "process"},
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["timestamp"] = utc_timestamp(record.created)
        super().add_fields(log_data, record, message_dict)


def resolve_format(log_format: LogFormat) -> Literal["text", "json"]:
    """``auto``: text when stderr is a terminal, JSON otherwise (containers, files, pipes)."""
    if log_format != "auto":
        return log_format
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(level: str, log_format: LogFormat = "auto") -> Literal["text", "json"]:
    """Install a stderr handler on the root logger unless it has one (a host application's,
    or a test runner's); returns the format chosen."""
    chosen = resolve_format(log_format)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLineFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(SafeRecordFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # httpx logs every request URL at INFO; ours are logged with less noise by the client.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    return chosen
