"""Spans of the session lifecycle. Every span about a session is a child of the context the
row keeps in ``traceparent``, so one trace follows a session from enqueue to end, even when
the end comes minutes later from another process. Attributes never carry secrets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

tracer = trace.get_tracer("orchestrator.lifecycle")
_propagator = TraceContextTextMapPropagator()
PREFIX = "orchestrator."


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def _context(traceparent: str | None) -> otel_context.Context | None:
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})


def span_context_of(traceparent: str | None) -> trace.SpanContext | None:
    context = _context(traceparent)
    if context is None:
        return None
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def _attributes(values: dict[str, Any]) -> dict[str, Any]:
    return {PREFIX + k: v for k, v in values.items() if v is not None}


@contextmanager
def session_span(name: str, traceparent: str | None = None, **attributes: Any) -> Iterator[Span]:
    """A span in the session's trace (``traceparent``), or under the current span if none."""
    with tracer.start_as_current_span(
        name, context=_context(traceparent), attributes=_attributes(attributes)
    ) as span:
        yield span


@contextmanager
def sweep_span(name: str) -> Iterator[Span]:
    """A sweep (reaper or reconciler pass) is its own trace, linked to the sessions it touched."""
    with tracer.start_as_current_span(name, context=otel_context.Context()) as span:
        yield span


def link_sessions(span: Span, traceparents: Sequence[str | None]) -> None:
    for traceparent in traceparents:
        span_context = span_context_of(traceparent)
        if span_context is not None:
            span.add_link(span_context)


def set_attributes(span: Span, **attributes: Any) -> None:
    span.set_attributes(_attributes(attributes))


def mark_error(span: Span, error_code: str) -> None:
    span.set_attribute(PREFIX + "error_code", error_code)
    span.set_status(StatusCode.ERROR, error_code)


__all__ = [
    "Link",
    "current_traceparent",
    "link_sessions",
    "mark_error",
    "session_span",
    "set_attributes",
    "span_context_of",
    "sweep_span",
]
