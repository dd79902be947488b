"""OpenTelemetry set-up for our own processes (worker, beat, CLI, demo), from the standard
``OTEL_*`` environment. Library use (the producer inside someone else's app) never calls this:
it uses whatever global provider that app installed.

With no exporter configured nothing is installed, so tracing costs nothing: the API's
no-op tracer answers our spans. Exporters: ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``
= ``otlp`` | ``console`` | ``none`` (default ``none``, or ``otlp`` when an
``OTEL_EXPORTER_OTLP_*ENDPOINT`` is set), comma-separated. ``OTEL_METRICS_EXPORTER`` may also
name ``prometheus``: the worker and beat (``serve_metrics``) then serve ``/metrics`` on
``OTEL_EXPORTER_PROMETHEUS_HOST``:``OTEL_EXPORTER_PROMETHEUS_PORT`` (localhost:9464); other
commands, run in the same container, skip it. ``ORCHESTRATOR_TRACE_FILE`` adds a JSON-lines
span file (the demo reads it to show a trace without a collector).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Status

from orchestrator import masking

SERVICE_NAME = "session-orchestrator"
TRACE_FILE_VARIABLE = "ORCHESTRATOR_TRACE_FILE"
_lock = threading.Lock()
_configured = False


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_record(span)) + "\n" for span in spans]
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.writelines(lines)
        return SpanExportResult.SUCCESS


# A database server's message quotes data on these lines (``DETAIL:  Failing row contains
# (…)`` holds a whole row, the payload with the customer's keys included).
_QUOTING_LINE = re.compile(r"^\s*(DETAIL|HINT|CONTEXT|WHERE):.*$\n?", re.MULTILINE)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def mask_text(text: str) -> str:
    """A text we did not write (a driver's error) as a span may carry it: no line that quotes
    data, no secret value of the request being handled, nothing JWT-shaped."""
    return _JWT.sub(masking.MASK, masking.mask(_QUOTING_LINE.sub("", text), masking.current()))


class MaskingSpanProcessor(SpanProcessor):
    """Hands ``inner`` a copy of each ended span whose status text and exception events are
    masked (:func:`mask_text`). OpenTelemetry's SQLAlchemy instrumentation sets a failed
    statement's status to the server's message; this runs in the thread that ended the span,
    where the request's secret values are known (:func:`orchestrator.masking.masking`)."""

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        description = span.status.description
        if description is None and not span.events:
            self._inner.on_end(span)
            return
        status = Status(span.status.status_code, mask_text(description)) if description else None
        events = [
            Event(
                event.name,
                {
                    key: mask_text(value) if isinstance(value, str) else value
                    for key, value in (event.attributes or {}).items()
                },
                event.timestamp,
            )
            for event in span.events
        ]
        self._inner.on_end(
            ReadableSpan(
                name=span.name,
                context=span.context,
                parent=span.parent,
                resource=span.resource,
                attributes=span.attributes,
                events=events,
                links=span.links,
                kind=span.kind,
                status=status or span.status,
                start_time=span.start_time,
                end_time=span.end_time,
                instrumentation_scope=span.instrumentation_scope,
            )
        )

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def span_record(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_text": span.status.description,
        "attributes": dict(span.attributes or {}),
        "links": [f"{link.context.trace_id:032x}" for link in span.links],
        "resource": dict(span.resource.attributes),
        "events": [event.name for event in span.events],
    }


def _exporter_names(signal: str) -> list[str]:
    configured = os.environ.get(f"OTEL_{signal}_EXPORTER")
    if configured is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    return [n.strip() for n in configured.split(",") if n.strip() and n.strip() != "none"]


def _span_exporter(name: str) -> SpanExporter:
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r} (otlp, console, none)")


def _prometheus_reader() -> MetricReader:
    """OpenTelemetry's Prometheus reader, served over HTTP by prometheus_client."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost")
    port_text = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")
    try:
        port = int(port_text)
        reader = PrometheusMetricReader()
        start_http_server(port, addr=host)
    except (ValueError, OSError) as error:
        where = f"OTEL_EXPORTER_PROMETHEUS_HOST/PORT ({host}:{port_text})"
        raise ValueError(f"{where}: cannot serve /metrics: {error}") from None
    return reader


def _metric_reader(name: str) -> MetricReader:
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return PeriodicExportingMetricReader(OTLPMetricExporter())
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    raise ValueError(
        f"OTEL_METRICS_EXPORTER: unsupported exporter {name!r} (otlp, console, prometheus, none)"
    )


def setup_telemetry(
    *,
    span_exporters: Sequence[SpanExporter] = (),
    metric_readers: Sequence[MetricReader] = (),
    serve_metrics: bool = False,
) -> bool:
    """Install providers and instrumentations once per process; False if nothing to export.

    Tests pass in-memory exporters/readers; everything else comes from the environment.
    ``serve_metrics``: this process serves ``/metrics`` if ``OTEL_METRICS_EXPORTER`` names
    ``prometheus`` (the long-running worker and beat; one port per container).
    """
    global _configured  # noqa: PLW0603 - once per process, guarded by the lock
    with _lock:
        if _configured:
            return True
        if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return False
        trace_file = os.environ.get(TRACE_FILE_VARIABLE)
        processors: list[Any] = [SimpleSpanProcessor(e) for e in span_exporters]
        processors += [BatchSpanProcessor(_span_exporter(n)) for n in _exporter_names("TRACES")]
        if trace_file:
            processors.append(SimpleSpanProcessor(JsonLinesSpanExporter(Path(trace_file))))
        names = _exporter_names("METRICS")
        readers = list(metric_readers) + [
            _prometheus_reader() if name == "prometheus" else _metric_reader(name)
            for name in names
            if name != "prometheus" or serve_metrics
        ]
        if not processors and not readers:
            return False
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)}
        )
        if processors:
            provider = TracerProvider(resource=resource)
            for processor in processors:
                provider.add_span_processor(MaskingSpanProcessor(processor))
            trace.set_tracer_provider(provider)
            _instrument_libraries()
        if readers:
            metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
        _configured = True
        return True


def _instrument_libraries() -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
    HTTPXClientInstrumentor().instrument()
    SQLAlchemyInstrumentor().instrument(enable_commenter=False)


def shutdown_telemetry() -> None:
    """Flush what is buffered (call before a process exits on its own)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush()
    meter_provider = metrics.get_meter_provider()
    if isinstance(meter_provider, MeterProvider):
        meter_provider.force_flush()
