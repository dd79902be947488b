"""Summaries of py-spy's raw (collapsed) stacks: where a worker's non-idle samples go."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_name(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/orchestrator/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/orchestrator/":
                path = "orchestrator/" + path
            break
    return f"{match.group('func')} ({path})"


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares of all samples, by function (file without line)."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread (")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if total == 0:
        return {"samples": 0}

    def share(counter: Counter[str], keep: int) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(keep)]

    return {
        "samples": total,
        "self_top": share(self_counts, top),
        "inclusive_top": share(inclusive, top * 3),
    }
