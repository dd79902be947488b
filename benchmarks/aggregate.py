"""Repetitions of one benchmark folded into one result: every figure becomes the median of the
repetitions with the min-max beside it, never the best run.

A benchmark's ``run()`` returns figures in four places, and each is folded its own way:

- ``targets``: ``value`` → median, with ``min``, ``max`` and every repetition's ``values``; the
  verdict is the median's, and ``met_runs`` says in how many repetitions the target was met;
- ``figures`` (a value beside a baseline): the ratio is taken within each repetition (the two
  were measured back to back) and its median reported, with the spread of each part;
- ``tables``: rows matched by their label (first cell), each numeric cell folded;
- text (``notes``, a target's ``detail``, table titles, text cells): texts that differ only in
  their numbers are folded number by number ("192.9 (180.2-201.3)"); texts that differ
  otherwise are listed per repetition.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from typing import Any

#: A number in running text: "1,648.7", "0.094", "256" (thousands separators kept apart from
#: a comma in a list, "10, 20").
DASH = "\u2013"  # between min and max
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")


def fmt(value: Any) -> str:
    """How the report writes a value: at most 3 decimals below 10, 1 above, thousands commas."""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of the repetitions' values (NaN left out; all NaN gives NaN)."""
    real = [v for v in values if _number(v) and not math.isnan(v)]
    if not real:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "values": list(values)}
    median = statistics.median(real)
    if all(isinstance(v, int) for v in real) and median == int(median):
        median = int(median)
    return {"median": median, "min": min(real), "max": max(real), "values": list(values)}


def with_spread(values: Sequence[Any], show: Callable[[Any], str] = fmt) -> str:
    """``median (min-max)``, or the value alone when every repetition gave the same."""
    s = spread(values)
    if s["min"] == s["max"] or math.isnan(s["min"]):
        return show(s["median"])
    return f"{show(s['median'])} ({show(s['min'])}{DASH}{show(s['max'])})"


def _fold_numbers(slot: Sequence[str]) -> str:
    if all(n == slot[0] for n in slot):
        return slot[0]
    decimals = max(len(n.split(".")[1]) if "." in n else 0 for n in slot)
    commas = any("," in n for n in slot)

    def show(value: float) -> str:
        return f"{value:,.{decimals}f}" if commas else f"{value:.{decimals}f}"

    return with_spread([float(n.replace(",", "")) for n in slot], show)


def fold_text(texts: Sequence[str]) -> str:
    """One text for the repetitions' texts: numbers folded when only numbers differ, else each
    distinct text with the repetitions that gave it."""
    if all(t == texts[0] for t in texts):
        return texts[0]
    skeletons = [NUMBER.split(t) for t in texts]
    if all(s == skeletons[0] for s in skeletons):
        numbers = [NUMBER.findall(t) for t in texts]
        out = [skeletons[0][0]]
        for i, slot in enumerate(zip(*numbers, strict=True)):
            out += [_fold_numbers(slot), skeletons[0][i + 1]]
        return "".join(out)
    distinct: dict[str, list[int]] = {}
    for i, t in enumerate(texts, 1):
        distinct.setdefault(t, []).append(i)
    return " · ".join(f"{_runs_label(runs)}: {t}" for t, runs in distinct.items())


def _runs_label(runs: Sequence[int]) -> str:
    return ("repetition " if len(runs) == 1 else "repetitions ") + ", ".join(map(str, runs))


def _fold_cell(values: Sequence[Any]) -> Any:
    if all(_number(v) for v in values):
        if all(v == values[0] for v in values):
            return values[0]
        return with_spread(values)
    return fold_text([fmt(v) for v in values])


def _skeleton(text: str) -> str:
    return NUMBER.sub("#", text)


def fold_notes(per_run: Sequence[Sequence[str]]) -> list[str]:
    """Notes grouped by their wording (numbers aside) and folded; a note that only some
    repetitions wrote is given as each of them wrote it."""
    groups: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for run, notes in enumerate(per_run, 1):
        seen: dict[str, int] = {}
        for note in notes:
            skeleton = _skeleton(note)
            seen[skeleton] = seen.get(skeleton, 0) + 1
            groups.setdefault((skeleton, seen[skeleton]), []).append((run, note))
    out = []
    for group in groups.values():
        if len(group) == len(per_run):
            out.append(fold_text([note for _, note in group]))
        else:
            out += [f"Repetition {run} of {len(per_run)}: {note}" for run, note in group]
    return out


def fold_table(tables: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows matched by their first cell when every first cell is a label, else by position."""
    keyed = all(isinstance(row[0], str) for t in tables for row in t["rows"])
    groups: dict[Any, list[list[Any]]] = {}
    for t in tables:
        for i, row in enumerate(t["rows"]):
            groups.setdefault(row[0] if keyed else i, []).append(row)
    rows = []
    for group in groups.values():
        width = min(len(r) for r in group)
        row = [_fold_cell([r[c] for r in group]) for c in range(width)]
        if len(group) < len(tables):
            row[0] = f"{row[0]} (in {len(group)} of {len(tables)} repetitions)"
        rows.append(row)
    return {
        "title": fold_text([t["title"] for t in tables]),
        "columns": tables[0]["columns"],
        "rows": rows,
    }


def fold_targets(per_run: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each target's value as the median of the repetitions (matched by position)."""
    out = []
    for targets in zip(*per_run, strict=False):
        s = spread([t.get("value", math.nan) for t in targets])
        out.append(
            {
                **targets[-1],
                "value": s["median"],
                "min": s["min"],
                "max": s["max"],
                "values": s["values"],
                "met_runs": sum(1 for t in targets if t.get("met")),
                "detail": fold_text([t.get("detail", "") for t in targets]),
            }
        )
    return out


def fold_figures(per_run: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A value beside a baseline: the ratio within each repetition, then the medians."""
    out = []
    for figures in zip(*per_run, strict=False):
        values = [f["value"] for f in figures]
        baselines = [f["baseline"] for f in figures]
        ratios = [
            v / b if _number(v) and _number(b) and b else math.nan
            for v, b in zip(values, baselines, strict=True)
        ]
        out.append(
            {
                **figures[-1],
                "value": spread(values)["median"],
                "values": values,
                "value_text": with_spread(values),
                "baseline": spread(baselines)["median"],
                "baselines": baselines,
                "baseline_text": with_spread(baselines),
                "ratio": spread(ratios)["median"],
                "ratios": ratios,
                "ratio_text": with_spread([round(r, 3) for r in ratios]),
                "detail": fold_text([f.get("detail", "") for f in figures]),
            }
        )
    return out


#: Keys of a result that are folded here; everything else stays in each repetition's entry.
FOLDED = ("targets", "figures", "tables", "notes", "plots", "code")


def fold(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One benchmark's entry from its repetitions' results (errors included: they are counted
    and listed, and the figures come from the repetitions that finished)."""
    done = [r for r in runs if "error" not in r]
    failed = [(i, r) for i, r in enumerate(runs, 1) if "error" in r]
    entry: dict[str, Any] = {
        "repetitions": len(runs),
        "completed": len(done),
        "seconds": round(sum(r.get("seconds", 0.0) for r in runs), 1),
        "runs": [{k: v for k, v in r.items() if k not in ("tables", "code")} for r in runs],
    }
    if not done:
        first = failed[0][1]
        return {**entry, "error": first["error"], "traceback": first.get("traceback", "")}
    notes = fold_notes([r.get("notes", []) for r in done])
    notes += [f"Repetition {i} failed: {r['error']}" for i, r in failed]
    per_run = [r.get("tables", []) for r in done]
    tables = [fold_table(group) for group in zip(*per_run, strict=False)]
    last = done[-1]
    shown = f" (repetition {runs.index(last) + 1} of {len(runs)})" if len(runs) > 1 else ""
    code = [{**block, "title": block["title"] + shown} for block in last.get("code", [])]
    return {
        **entry,
        "targets": fold_targets([r.get("targets", []) for r in done]),
        "figures": fold_figures([r.get("figures", []) for r in done]),
        "tables": tables,
        "notes": notes,
        "plots": last.get("plots", []),
        "code": code,
    }
