"""A compact text view of one trace from JSON-lines span files (no collector needed)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SQL_KEYS = ("db.system", "db.system.name")


def read_span_files(paths: Iterable[Path]) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    for path in paths:
        if path.exists():
            spans.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return spans


def find_trace(spans: list[dict[str, Any]], request_id: str) -> str | None:
    for span in spans:
        if span["attributes"].get("orchestrator.request_id") == request_id:
            return str(span["trace_id"])
    return None


def _is_sql(span: dict[str, Any]) -> bool:
    return any(key in span["attributes"] for key in SQL_KEYS)


def render_trace(spans: list[dict[str, Any]], trace_id: str) -> str:
    """Span names as a tree with start offsets and durations; SQL spans folded into counts."""
    mine = sorted((s for s in spans if s["trace_id"] == trace_id), key=lambda s: s["start_ns"])
    if not mine:
        return f"trace {trace_id}: no spans"
    ids = {s["span_id"] for s in mine}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for span in mine:
        parent = span["parent_id"] if span["parent_id"] in ids else None
        children[parent].append(span)
    origin = mine[0]["start_ns"]
    lines = [f"trace {trace_id}: {len(mine)} spans"]

    def walk(parent: str | None, depth: int) -> None:
        kids = children.get(parent, [])
        sql = [k for k in kids if _is_sql(k)]
        for span in kids:
            if _is_sql(span):
                continue
            offset = (span["start_ns"] - origin) / 1e6
            duration = (span["end_ns"] - span["start_ns"]) / 1e6
            detail = _detail(span)
            lines.append(
                f"  {offset:>9.1f} ms  {'  ' * depth}{span['name']}  ({duration:.1f} ms){detail}"
            )
            walk(span["span_id"], depth + 1)
        if sql:
            total = sum((s["end_ns"] - s["start_ns"]) / 1e6 for s in sql)
            lines.append(f"  {'':>12}  {'  ' * depth}+ {len(sql)} SQL statements ({total:.1f} ms)")

    walk(None, 0)
    return "\n".join(lines)


def _detail(span: dict[str, Any]) -> str:
    attributes = span["attributes"]
    shown = [
        f"{key.removeprefix('orchestrator.')}={attributes[key]}"
        for key in ("orchestrator.status", "orchestrator.end_reason", "orchestrator.error_code")
        if key in attributes
    ]
    if "http.response.status_code" in attributes:
        shown.append(f"http {attributes['http.response.status_code']}")
    return "  " + " ".join(shown) if shown else ""
