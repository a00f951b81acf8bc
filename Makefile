# Two commands on a fresh machine (only Python >= 3.11 and make needed):
#   make run    create the environment, install, migrate, serve on 127.0.0.1:8000
#   make test   the whole test suite (PostgreSQL at TEST_DATABASE_URL)
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .uv/bin/uv
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint install bench

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --frozen --python "$$($(PYTHON) -c 'import sys; print(sys.executable)')"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/todo-api serve --host 127.0.0.1 --port 8000

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The benchmark (PostgreSQL at 127.0.0.1:5432, wrk and pgbench): see bench/README.md.
bench: install
	$(BIN)/python bench/run.py
