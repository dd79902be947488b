"""The wheel ships every package folder (the list in pyproject.toml is explicit)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "orchestrator").rglob("__init__.py")
    }
    found |= {
        "orchestrator." + ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "migrations").rglob("__init__.py")
    }
    assert found == listed
    assert config["package-dir"] == {"orchestrator.migrations": "migrations"}
