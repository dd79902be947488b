"""Log lines in a real process: JSON (one object per line, UTC, the current span's ids, the
`extra=` fields, secret-named fields and JWT-shaped text masked) or text with the same
fields; `auto` picks JSON unless stderr is a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from orchestrator.logging_setup import configure_logging

trace.set_tracer_provider(TracerProvider())
print(configure_logging(sys.argv[1], sys.argv[2]), flush=True)
log = logging.getLogger("orchestrator.test")
with trace.get_tracer("t").start_as_current_span("s") as span:
    context = span.get_span_context()
    print(f"{context.trace_id:032x} {context.span_id:016x}", flush=True)
    extra = {"request_id": "r-1", "attempt": 2, "livekit_token": "lk-secret"}
    log.info("started %s", "r-1", extra=extra)
log.warning("vendor said eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl in its reply")
log.debug("hidden at INFO")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("failed")
# Celery passes each task's context, its kwargs included, as extra "data".
context = {"id": "t1", "name": "orchestrator.start_session", "kwargs": "{'headers': 'sk-llm-key'}"}
logging.getLogger("celery.app.trace").info("Task %(name)s[%(id)s] received", context,
                                           extra={"data": context})
"""


def run(level: str, log_format: str) -> tuple[list[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, level, log_format],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines(), done.stderr.splitlines()


@pytest.mark.parametrize("log_format", ["json", "auto"])  # auto: stderr is a pipe here
def test_json_lines_carry_trace_ids_and_extras_and_no_secret(log_format: str) -> None:
    out, err = run("info", log_format)
    assert out[0] == "json"
    trace_id, span_id = out[1].split()
    records = [json.loads(line) for line in err]  # every line is one JSON object
    assert [r["level"] for r in records] == ["INFO", "WARNING", "ERROR", "INFO"]
    started, vendor, failed, celery = records
    assert started["message"] == "started r-1" and started["logger"] == "orchestrator.test"
    assert (started["trace_id"], started["span_id"]) == (trace_id, span_id)
    assert (started["request_id"], started["attempt"]) == ("r-1", 2)
    assert started["livekit_token"] == "***"
    assert started["timestamp"].endswith("Z") and started["process"] == "MainProcess"
    assert "trace_id" not in vendor  # no span was current
    assert vendor["message"] == "vendor said *** in its reply"
    assert "RuntimeError: boom" in failed["exc_info"]
    assert celery["message"] == "Task orchestrator.start_session[t1] received"
    assert "data" not in celery
    for secret in ("lk-secret", "eyJhbGci", "sk-llm-key"):
        assert secret not in "\n".join(err)


def test_text_lines_carry_the_same_fields() -> None:
    out, err = run("DEBUG", "text")
    assert out[0] == "text"
    trace_id, span_id = out[1].split()
    started = next(line for line in err if "started r-1" in line)
    assert started.split()[0].endswith("Z")  # UTC, labelled
    assert "request_id=r-1 attempt=2 livekit_token=***" in started
    assert f"trace_id={trace_id} span_id={span_id}" in started
    assert any("hidden at INFO" in line for line in err)  # DEBUG, given in lower case
    for secret in ("lk-secret", "eyJhbGci", "sk-llm-key"):
        assert secret not in "\n".join(err)
