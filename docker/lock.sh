#!/usr/bin/env bash
# Regenerate docker/requirements.lock: every runtime dependency of pyproject.toml, its
# [simulator] extra (the image serves that role too) and the build backend
# (docker/build-requirements.in), pinned with sha256 hashes.
# Run from anywhere after changing [project].dependencies or [build-system].requires:
#   docker/lock.sh            (needs python3 and access to PyPI)
#   docker/lock.sh --upgrade  (extra arguments go to `uv pip compile`)
# uv is installed into a throwaway virtualenv, never into the project's own.
set -euo pipefail

UV_VERSION="0.13.9"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==${UV_VERSION}"

cd "$root"
"$tmp/venv/bin/uv" pip compile \
    pyproject.toml docker/build-requirements.in \
    --extra simulator \
    --universal \
    --python-version 3.11 \
    --generate-hashes \
    --no-cache \
    --quiet \
    --custom-compile-command "docker/lock.sh" \
    --output-file docker/requirements.lock \
    "$@"
