# Two commands on a fresh machine (only Python >= 3.11 and make needed):
#   make run    create the environment, install, migrate, serve on 127.0.0.1:8000 (PORT=...)
#               on DATABASE_URL, or on the embedded PostgreSQL server when it is unset
#   make test   the whole test suite, on TEST_DATABASE_URL's server or the embedded one
#               (and TEST_REDIS_URL's Redis, or a private one it starts)
PYTHON ?= python3
PORT ?= 8000
UV_VERSION := 0.13.9
UV := .uv/bin/uv
VENV ?= .venv
BIN := $(VENV)/bin
# uv installs into $(VENV), whichever directory that is.
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
SYNC := $(UV) sync --frozen --python "$$($(PYTHON) -c 'import sys; print(sys.executable)')"

.PHONY: run test lint install install-runtime bench bench-ratelimit frontend-check system-check

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

# Runtime dependencies only (what `make run` and the image need); `--inexact` leaves the dev
# tools of an earlier `make test` in place instead of uninstalling them.
$(VENV)/.runtime: pyproject.toml uv.lock $(UV)
	$(SYNC) --no-dev --inexact
	touch $@

# Everything, the dev group (pytest, ruff, mypy, ...) included: for tests, lint and benchmarks.
$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	$(SYNC)
	touch $@ $(VENV)/.runtime

install-runtime: $(VENV)/.runtime

install: $(VENV)/.installed

run: install-runtime
	$(BIN)/todo-api serve --host 127.0.0.1 --port $(PORT)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The benchmark (PostgreSQL at 127.0.0.1:5432, wrk, pgbench and psql): see bench/README.md.
# About 11 minutes; `make bench BENCH_ARGS=--quick` is a smoke run of every part (~3 minutes).
bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# What rate limiting (in memory, in Redis) costs on the create path: see bench/README.md.
bench-ratelimit: install
	$(BIN)/python bench/ratelimit.py

# What a frontend sees: OpenAPI lint, a typed TypeScript client compiled with tsc --strict,
# and browser tests in Debian's chromium. Needs npm and chromium (installed here when root).
frontend-check: install
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		{ echo "frontend-check needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; }
	cd clients && npm ci --no-audit --no-fund
	$(BIN)/python clients/export_openapi.py clients/build/openapi.json
	cd clients && npm run --silent lint && npm run --silent types && npm run --silent check
	$(BIN)/pytest -m browser tests/browser

# Tests that need root: network namespaces joined by a veth pair (tests/test_vanished_client.py).
system-check: install
	command -v ip >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; } || \
		{ echo "system-check needs iproute2's ip: sudo apt-get install iproute2" >&2; exit 1; }
	[ "$$(id -u)" = 0 ] || { echo "system-check needs root (network namespaces)" >&2; exit 1; }
	$(BIN)/pytest -m netns tests
