"""Masking secret values in text we did not write — a vendor error that echoes the request, a
database server's message quoting a row — before it is stored, published, logged or exported.

By value, not by pattern: the values come from the request itself (its ``headers``,
``extra_headers`` and ``auth_plugins``: :func:`orchestrator.contract.secret_values`).
Each is masked as sent, as JSON would escape it, and word by word (a vendor may quote only the
key of ``Bearer <key>``), before and after the text's whitespace is collapsed.

Short values: a value of ``MIN_ANYWHERE`` (8) characters or more is masked wherever it appears;
one of ``MIN_WORD`` (4) to 7 only where it stands as a word of its own, since masking ``"pin4"``
inside other words would garble the message for nothing; one shorter than 4 is not masked: it
cannot be told from ordinary text (a plugin's ``"kind": "jwt"``, a header ``"1"``), and no
credential is that short (so few characters are guessed at once, masked or not).

A request's values are known while it is handled (:func:`masking`, a context variable), so the
telemetry's span processor can mask span status texts too (orchestrator/telemetry.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["MASK", "MIN_ANYWHERE", "MIN_WORD", "current", "mask", "masking"]

MASK = "***"
MIN_ANYWHERE = 8
MIN_WORD = 4
_WORD_CHAR = r"[A-Za-z0-9_\-]"
_current: ContextVar[frozenset[str]] = ContextVar("orchestrator_secret_values", default=frozenset())


def _variants(value: str) -> set[str]:
    """The forms in which a value may be quoted: as is, JSON-escaped, and each of its words."""
    forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    forms.update(value.split())
    return {form for form in forms if len(form) >= MIN_WORD}


def mask(text: str, values: Iterable[str]) -> str:
    """``text`` with every form of every value replaced by ``***`` (short ones as whole words)."""
    forms: set[str] = set()
    for value in values:
        forms |= _variants(value)
    for form in sorted(forms, key=len, reverse=True):  # a longer form before its parts
        if form not in text:
            continue
        if len(form) >= MIN_ANYWHERE:
            text = text.replace(form, MASK)
        else:
            pattern = rf"(?<!{_WORD_CHAR}){re.escape(form)}(?!{_WORD_CHAR})"
            text = re.sub(pattern, MASK, text)
    return text


def current() -> frozenset[str]:
    """The secret values of the request being handled in this context (empty if none)."""
    return _current.get()


@contextmanager
def masking(values: Iterable[str]) -> Iterator[None]:
    """Within this block, spans ending in this context mask these values too."""
    token = _current.set(_current.get() | frozenset(values))
    try:
        yield
    finally:
        _current.reset(token)
