#!/usr/bin/env bash
# Build docker/Dockerfile without a Docker engine or a registry, for `make image-test`:
#   docker/ci-image.sh              build (or reuse) the local base, then the image
#   docker/ci-image.sh --print-env  the settings the image tests read (sourced by make)
#
# buildah (Debian's package) builds the Dockerfile unchanged, with chroot isolation and the
# vfs storage driver, in a storage folder kept between runs ($ORCHESTRATOR_CI_STORAGE), so the
# base and the cached layers survive across runs and clones on the same machine.
#
# No registry is reachable from CI, so the base is made locally, once: a Debian bookworm
# minbase (debootstrap, from the mirror apt uses here) with python3, python3-venv and a
# virtualenv at /usr/local, so `python` and `pip` behave as in the official slim image. It is
# passed through the Dockerfile's PYTHON_IMAGE argument; production builds keep the official
# python:3.11.x-slim-bookworm. The package index is reached with the host's CA bundle mounted
# read-only into the build (a TLS-intercepting proxy's CA, if any, included); TLS checks stay on.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
storage="${ORCHESTRATOR_CI_STORAGE:-/var/lib/orchestrator-ci/containers}"
runroot="${ORCHESTRATOR_CI_RUNROOT:-/run/orchestrator-ci/containers}"
base="${ORCHESTRATOR_CI_BASE:-localhost/orchestrator-base:bookworm}"
image="${ORCHESTRATOR_CI_IMAGE:-localhost/session-orchestrator:ci}"
certs="${ORCHESTRATOR_CI_CERTS:-/etc/ssl/certs}"

if [ "${1:-}" = "--print-env" ]; then
  printf 'ORCHESTRATOR_CI_STORAGE=%s\nORCHESTRATOR_CI_RUNROOT=%s\nORCHESTRATOR_CI_IMAGE=%s\n' \
    "$storage" "$runroot" "$image"
  exit 0
fi

bh() {
  buildah --root "$storage" --runroot "$runroot" --storage-driver vfs "$@"
}

# The Debian mirror apt uses on this machine (deb822 sources first, then sources.list).
debian_mirror() {
  local uri
  uri="$(grep -hs -A3 '^Types:.*deb' /etc/apt/sources.list.d/*.sources \
    | sed -n 's/^URIs:[[:space:]]*//p' | grep -v -- '-security' | head -n1 || true)"
  if [ -z "$uri" ]; then
    uri="$(grep -hs '^deb[[:space:]]' /etc/apt/sources.list \
      | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

make_base() {
  local mirror ctr mnt
  mirror="$(debian_mirror)"
  echo "ci-image: making the local base $base (debootstrap bookworm from $mirror; once per machine)"
  ctr="$(bh from scratch)"
  mnt="$(bh mount "$ctr")"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg bookworm "$mnt" "$mirror" \
    > "$storage/debootstrap.log" 2>&1 \
    || { tail -n 20 "$storage/debootstrap.log" >&2; exit 1; }
  # A virtualenv over /usr/local: `python` and `pip` first on the PATH, as in the official
  # image (whose interpreter lives there). Debian's pip reads certificates from its own
  # bundle unless told otherwise; point it at the system store (mounted at build time).
  chroot "$mnt" python3 -m venv /usr/local
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$mnt/etc/pip.conf"
  chroot "$mnt" apt-get clean
  rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin \
    "$mnt"/usr/share/doc/* "$mnt"/usr/share/man/* "$mnt"/usr/share/info/*
  bh unmount "$ctr" > /dev/null
  bh config \
    --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd python3 \
    --label org.opencontainers.image.description="Local stand-in for python:3.11-slim-bookworm (CI only)" \
    "$ctr"
  bh commit --quiet --rm "$ctr" "$base" > /dev/null
}

for cmd in buildah debootstrap; do
  command -v "$cmd" > /dev/null || { echo "ci-image: $cmd is not installed (apt-get install $cmd)" >&2; exit 1; }
done
mkdir -p "$storage" "$runroot"

start=$SECONDS
if ! bh inspect --type image "$base" > /dev/null 2>&1; then
  make_base
  echo "ci-image: base ready in $((SECONDS - start)) s"
fi

# The commit, plus a digest of uncommitted changes (and untracked files) if any.
revision() {
  local head dirty
  head="$(git -C "$root" rev-parse HEAD 2> /dev/null)" || { echo "unknown-$(date +%s)"; return; }
  dirty="$( { git -C "$root" diff HEAD --binary
              git -C "$root" ls-files -z --others --exclude-standard \
                | (cd "$root" && xargs -0 -r sha256sum); } | sha256sum | cut -c1-12)"
  if [ -z "$(git -C "$root" status --porcelain)" ]; then echo "$head"; else echo "$head-dirty-$dirty"; fi
}

built=$SECONDS
cd "$root"
# --layers keeps each step as a cached layer: the dependency wheels are rebuilt only when the
# lock changes (COPY steps are keyed on content). buildah does not key the runtime stage's
# `RUN --mount=...,from=build` on what the build stage made, so REVISION (a label, and part of
# the key of every RUN of that stage) names the sources: the runtime stage is redone whenever
# they change. The ignore file is the one BuildKit reads next to the Dockerfile.
args=(--quiet --layers --force-rm --isolation chroot
  --ignorefile docker/Dockerfile.dockerignore
  --volume "$certs:/etc/ssl/certs:ro"
  --build-arg PYTHON_IMAGE="$base"
  --build-arg REVISION="$(revision)"
  --file docker/Dockerfile)
bh bud "${args[@]}" --tag "$image" . > /dev/null
# vfs stores every layer as a full copy, so each change of the sources adds about a gigabyte.
# Past a limit, drop every image no tag needs (earlier builds, and the cached dependency
# wheels: the next build downloads them again). The base stays.
limit_mb="${ORCHESTRATOR_CI_STORAGE_LIMIT_MB:-8000}"
if [ "$(du -sm "$storage" | cut -f1)" -gt "$limit_mb" ]; then
  echo "ci-image: storage over ${limit_mb} MB, pruning untagged images"
  bh rmi --prune > /dev/null || echo "ci-image: some images are still in use by containers" >&2
fi
size="$(bh images --format '{{.Size}}' "$image" | head -n1)"
echo "ci-image: built $image ($size) in $((SECONDS - built)) s"
