"""Reading account definitions from a mounted folder and from environment variables.

Every error is one :class:`AccountsError` line naming the file or variable (and the field),
and never a secret's value.

**Folder** (a Kubernetes Secret mounted as files): every ``NAME.json`` holds one account,
``{"app_id": ..., "user_key": ..., "cap": 20, "weight": 2, "labels": {"region": "eu"}}``
(its name is the file's; a ``"name"`` inside must equal it), and ``accounts.json`` may hold
a list of accounts, each with its ``"name"``. Names starting with ``.`` (the mount's own
``..data`` links) are skipped; any other file is an error.

**Environment**: ``ORCHESTRATOR_ACCOUNT_<NAME>_<FIELD>``, ``<NAME>`` the account name
upper-cased with ``-`` as ``_``, ``<FIELD>`` one of ``APP_ID``, ``USER_KEY``, ``CAP``,
``WEIGHT``, ``LABELS`` (``region=eu,tier=gold``). Variables of a name with neither
``APP_ID`` nor ``USER_KEY`` are **metadata** for an account defined elsewhere (the keys in a
mounted Secret, the cap, weight and labels from the chart's ConfigMap): an :class:`Overlay`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from orchestrator.accounts.model import ACCOUNT_NAME, FIELDS, SECRET_FIELDS, Account
from orchestrator.config import ConfigError

ENV_ACCOUNT_PREFIX: Final = "ORCHESTRATOR_ACCOUNT_"
LIST_FILE: Final = "accounts.json"
MAX_FILE_BYTES: Final = 64 * 1024


class AccountsError(ConfigError):
    """An account definition is missing or malformed; the message names where."""


@dataclass(frozen=True)
class Defined:
    """An account and where it was defined (a file or variable prefix, for messages)."""

    account: Account
    source: str


def describe(error: ValidationError, where: str) -> str:
    """One line for the first problem, with the value only when it is not a secret."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "account"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown field (expected {', '.join(('name', *FIELDS))})"
    shown = ""
    if field.split(".")[0] not in SECRET_FIELDS and first["type"] != "extra_forbidden":
        shown = f" (got {first.get('input')!r})"
    return f"{where}: {field}: {message}{shown}"


def build(values: Mapping[str, Any], where: str) -> Account:
    try:
        return Account.model_validate(dict(values))
    except ValidationError as error:
        raise AccountsError(describe(error, where)) from None


# -- folder --------------------------------------------------------------------------


def folder_entries(folder: Path) -> list[Path]:
    """The files that define accounts, sorted (hidden names skipped)."""
    try:
        names = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        raise AccountsError(f"{folder}: accounts folder does not exist") from None
    except NotADirectoryError:
        raise AccountsError(f"{folder}: not a folder") from None
    except OSError as error:
        raise AccountsError(f"{folder}: cannot list ({error.strerror})") from None
    for path in names:
        if path.suffix != ".json":
            raise AccountsError(f"{path}: not an account file (NAME.json or {LIST_FILE})")
    return names


def _read_json(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise AccountsError(f"{path}: cannot read ({error.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise AccountsError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise AccountsError(f"{path}: not UTF-8 text") from None
    except ValueError as error:
        # The position only: the decoder's message never quotes the document.
        raise AccountsError(
            f"{path}: not valid JSON (line {getattr(error, 'lineno', '?')})"
        ) from None


def read_folder(folder: Path) -> Iterator[Defined]:
    for path in folder_entries(folder):
        data = _read_json(path)
        if path.name == LIST_FILE:
            if not isinstance(data, list):
                raise AccountsError(f"{path}: must be a list of accounts")
            for number, item in enumerate(data, 1):
                where = f"{path} (account {number})"
                if not isinstance(item, dict):
                    raise AccountsError(f"{where}: must be an object")
                if "name" not in item:
                    raise AccountsError(f"{where}: name: required")
                yield Defined(build(item, where), str(path))
            continue
        if not isinstance(data, dict):
            raise AccountsError(f"{path}: must be an object")
        name = path.stem
        if "name" in data and data["name"] != name:
            raise AccountsError(f"{path}: name: must equal the file's name {name!r}")
        if not ACCOUNT_NAME.fullmatch(name):
            raise AccountsError(f"{path}: file name must be an account name ([a-z0-9-]{{1,63}})")
        yield Defined(build({**data, "name": name}, str(path)), str(path))


# -- environment -----------------------------------------------------------------------


def env_prefix(name: str) -> str:
    return f"{ENV_ACCOUNT_PREFIX}{name.upper().replace('-', '_')}_"


@dataclass(frozen=True)
class Overlay:
    """Non-secret fields (cap, weight, labels) for an account whose keys are defined
    elsewhere; the fields are checked (an :class:`Account` with placeholder keys)."""

    name: str
    values: Mapping[str, Any]
    source: str


def _grouped(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    grouped: dict[str, dict[str, str]] = {}
    suffixes = [(f"_{field.upper()}", field) for field in FIELDS]
    for variable in sorted(environ):
        if not variable.startswith(ENV_ACCOUNT_PREFIX):
            continue
        rest = variable.removeprefix(ENV_ACCOUNT_PREFIX)
        match = next(((rest[: -len(s)], f) for s, f in suffixes if rest.endswith(s)), None)
        if match is None or not match[0]:
            expected = ", ".join(f.upper() for f in FIELDS)
            raise AccountsError(
                f"{variable}: not {ENV_ACCOUNT_PREFIX}<NAME>_<FIELD> (FIELD one of {expected})"
            )
        raw_name, field = match
        name = raw_name.lower().replace("_", "-")
        if not ACCOUNT_NAME.fullmatch(name):
            raise AccountsError(f"{variable}: account name must match [a-z0-9-]{{1,63}}")
        grouped.setdefault(name, {})[field] = environ[variable]
    return grouped


def _validated(name: str, values: Mapping[str, str]) -> Account:
    prefix = env_prefix(name)
    try:
        return Account.model_validate({**values, "name": name})
    except ValidationError as error:
        field = str(error.errors()[0]["loc"][0]) if error.errors()[0]["loc"] else "?"
        line = describe(error, f"{prefix}{field.upper()}")
        raise AccountsError(line.replace(f": {field}: ", ": ", 1)) from None


def read_environment(environ: Mapping[str, str]) -> Iterator[Defined]:
    """Accounts defined whole by variables (metadata-only names: :func:`read_overlays`)."""
    for name, values in _grouped(environ).items():
        if not SECRET_FIELDS & set(values):
            continue
        prefix = env_prefix(name)
        for required in ("app_id", "user_key"):
            if required not in values:
                raise AccountsError(f"{prefix}{required.upper()}: required (account {name})")
        yield Defined(_validated(name, values), f"{prefix}*")


def read_overlays(environ: Mapping[str, str]) -> Iterator[Overlay]:
    """Metadata-only variables (no ``APP_ID``/``USER_KEY``), each name's fields checked."""
    for name, values in _grouped(environ).items():
        if SECRET_FIELDS & set(values):
            continue
        _validated(name, {**values, "app_id": "overlay", "user_key": "overlay"})
        yield Overlay(name, dict(values), f"{env_prefix(name)}*")
