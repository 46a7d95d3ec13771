# The front door: CI and people only call these targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PROTO_SRC := $(shell find protos -name '*.proto')
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# `make run`: the stack's data directory (wiped at each run: a replay of old data needs fresh
# streams and tables) and the replay's pace in events/s, so the whole run fits in 5 minutes.
RUN_DIR := .monolith-run
RUN_SPEED ?= 100
# The lock pins the runtime dependencies and the extras (test, loadtest, bench), with the hash of
# every file, for CPython 3.11 on x86-64 Linux whatever machine runs `make lock`. Versions
# already in the lock are kept while they still satisfy pyproject.toml, so regenerating is
# repeatable and `make lock-check` does not fail because a new release appeared.
LOCK_ARGS := pyproject.toml --extra test --extra loadtest --extra bench --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" --quiet
# The container image's lock: the runtime dependencies and the loadtest extra (the chart's
# Locust runs from the same image), constrained to requirements.lock's pins, so the image runs
# exactly the versions the tests ran, without the developer tools.
IMAGE_LOCK := requirements-image.lock
IMAGE_LOCK_ARGS := pyproject.toml --extra loadtest --constraint $(LOCK) --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" --quiet

.DEFAULT_GOAL := help
.PHONY: help setup lock lock-check protos lint test test-fast test-unit test-integration bench run clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(STAMP) protos ## Create .venv, install the locked dependencies (with the test extras), generate protobuf code

lock: $(STAMP) ## Regenerate requirements.lock (and the image's requirements-image.lock) from pyproject.toml (uv, with hashes)
	$(VENV)/bin/uv pip compile $(LOCK_ARGS) -o $(LOCK)
	$(VENV)/bin/uv pip compile $(IMAGE_LOCK_ARGS) -o $(IMAGE_LOCK)

lock-check: $(STAMP) ## Fail if requirements.lock is stale: regenerate it into a copy and compare
	@fresh=$$(mktemp) && cp $(LOCK) $$fresh && \
	$(VENV)/bin/uv pip compile $(LOCK_ARGS) -o $$fresh && \
	if diff -u $(LOCK) $$fresh; then rm -f $$fresh; \
	else rm -f $$fresh; echo "$(LOCK) is stale relative to pyproject.toml: run make lock" >&2; exit 1; fi
	@fresh=$$(mktemp) && cp $(IMAGE_LOCK) $$fresh && \
	$(VENV)/bin/uv pip compile $(IMAGE_LOCK_ARGS) -o $$fresh && \
	if diff -u $(IMAGE_LOCK) $$fresh; then rm -f $$fresh; \
	else rm -f $$fresh; echo "$(IMAGE_LOCK) is stale relative to $(LOCK): run make lock" >&2; exit 1; fi

protos: $(STAMP) ## Generate Python code from protos/ into services/monolith/api/
	@$(PY) -m monolith.protogen protos services

lint: setup lock-check ## Static checks (undefined names, unused imports, import floors, the Dockerfile) and fresh locks
	$(VENV)/bin/ruff check --select F services clients tests
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/hadolint Dockerfile

test: setup lint ## Static checks, then all tests (unit, integration, e2e)
	$(PY) -m pytest -q tests

test-fast: setup lint ## Static checks, then every test not marked slow (no benchmark smoke runs)
	$(PY) -m pytest -q -m "not slow" tests

test-unit: setup ## Run the unit tests only
	$(PY) -m pytest -q tests/unit

test-integration: setup ## Run the integration tests only
	$(PY) -m pytest -q tests/integration

bench: setup ## Run the table benchmark (see `monolith bench --help` for the others)
	$(VENV)/bin/monolith bench table --json

run: setup ## The local stack + a live replay of MovieLens-100k (under 5 min): summary and a rolling-AUC plot
	rm -rf $(RUN_DIR)
	$(VENV)/bin/monolith replay --up --data-dir $(RUN_DIR) --speed $(RUN_SPEED)

clean: ## Remove the virtual environment and generated code
	rm -rf $(VENV) services/monolith/api .pytest_cache .hypothesis
