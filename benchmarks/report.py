"""The Markdown report (and plots, when matplotlib is installed) from the results document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.aggregate import fmt as _fmt
from benchmarks.aggregate import with_spread


def _target_line(t: dict[str, Any]) -> str:
    verdict = "**met**" if t.get("met") else "**missed**"
    miss = t.get("miss_by")
    if not t.get("met") and isinstance(miss, float):
        verdict += f" (by {miss:.0%})"
    runs = t.get("values", [])
    if len(runs) > 1:
        verdict += f"; met in {t.get('met_runs', 0)} of {len(runs)}"
    value = with_spread(runs) if runs else _fmt(t.get("value"))
    goal = f"{t['op']} {_fmt(t['target'])}"
    unit = t.get("unit", "")
    return f"| {t['name']} | {value} {unit} | {goal} | {verdict} | {t.get('detail', '')} |"


def _figure_line(f: dict[str, Any]) -> str:
    unit = f.get("unit", "")
    value = f.get("value_text", _fmt(f["value"]))
    baseline = f.get("baseline_text", _fmt(f["baseline"]))
    ratio = f.get("ratio_text") or _fmt(f["value"] / f["baseline"] if f.get("baseline") else None)
    return (
        f"| {f['name']} | {value} {unit} | no target | {ratio}x {f['baseline_name']}"
        f" ({baseline} {unit}) | {f.get('detail', '')} |"
    )


#: What limits each missed target, from profiles (py-spy, pg_stat_activity): the report quotes
#: it after the targets table.
ANALYSIS = Path(__file__).resolve().parent / "analysis.md"


def write_report(document: dict[str, Any], results_dir: Path, name: str) -> Path:
    machine = document["machine"]
    load = " ".join(machine["loadavg_at_start"])
    repetitions = document.get("repetitions", 1)
    lines = [
        "# session-orchestrator benchmarks",
        "",
        f"Run {machine['date']} with `{document['command']}`"
        f"{' (quick variants)' if document['quick'] else ''}, {document['total_seconds']} s.",
        "",
        (
            f"Every benchmark ran {repetitions} times, in rounds (P1…P6, then again). Each"
            " figure is the **median** of the repetitions with the min-max in brackets (one"
            " value: every repetition gave it); a ratio to a baseline is taken within each"
            " repetition, where the two ran back to back, and then its median. The verdict is"
            " the median's. Every repetition's figures are in the JSON file."
            if repetitions > 1
            else "One repetition: no spread (`make bench` runs three)."
        ),
        "",
        f"Machine: {machine['nproc']} x {machine['cpu_model']}, {machine['memory_gib']} GiB RAM,"
        f" Linux {machine['kernel']}, Python {machine['python']}, PostgreSQL {machine['postgres']},"
        f" RabbitMQ {machine['rabbitmq']}; load average at start {load}."
        " Everything (Postgres, RabbitMQ, the simulator, the workers, the load generator) shares"
        " these cores, so every figure is given beside a baseline measured in the same run.",
        "",
        *[
            f"Re-run and merged in on {m['date']}: {', '.join(m['replaced'])} (`{m['command']}`)."
            for m in document.get("merged", [])
        ],
        "",
        "## Targets",
        "",
        "| benchmark | measure | value | target | verdict | context |",
        "|---|---|---|---|---|---|",
    ]
    for key, result in document["benchmarks"].items():
        if "skipped" in result:
            lines.append(f"| {key} | {result['title']} | — | — | skipped: {result['skipped']} | |")
            continue
        if "error" in result:
            lines.append(f"| {key} | {result['title']} | — | — | **error**: {result['error']} | |")
            continue
        for t in result.get("targets", []):
            lines.append(f"| {key} " + _target_line(t))
        for f in result.get("figures", []):
            lines.append(f"| {key} " + _figure_line(f))
    if ANALYSIS.exists():  # written by hand from profiles, so it is dated in its own text
        lines += ["", ANALYSIS.read_text().rstrip()]
    for key, result in document["benchmarks"].items():
        lines += ["", f"## {key}: {result['title']}", ""]
        if "skipped" in result:
            lines.append(f"Skipped: {result['skipped']}.")
            continue
        if "error" in result:
            lines += ["Failed:", "", "```", result.get("traceback", result["error"]), "```"]
            continue
        if result.get("repetitions", 1) > 1:
            times = ", ".join(_fmt(r.get("seconds")) for r in result.get("runs", []))
            lines += [f"{result['repetitions']} repetitions ({times} s).", ""]
        for paragraph in result.get("notes", []):
            lines += [paragraph, ""]
        for table in result.get("tables", []):
            lines += [f"**{table['title']}**", "", *_table(table["columns"], table["rows"]), ""]
        for image in result.get("plots", []):
            lines += [f"![{key}]({image})", ""]
        for block in result.get("code", []):
            lines += [f"**{block['title']}**", "", "```", block["text"].rstrip(), "```", ""]
    path = results_dir / f"{name}.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return out


def try_plot(
    path: Path,
    series: dict[str, tuple[list[float], list[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: dict[str, float] | None = None,
    vspans: dict[str, tuple[float, float]] | None = None,
) -> bool:
    """Line plot of ``series`` (label → (xs, ys)); False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, linewidth=1.4)
    for label, (x0, x1) in (vspans or {}).items():
        ax.axvspan(x0, x1, color="grey", alpha=0.12, label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="grey", linewidth=1)
        ax.annotate(label, (0, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
