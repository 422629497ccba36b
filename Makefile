# Developer and CI entry points. `make test` is what CI runs (.ci/run):
# deps -> services -> lint -> pytest (unit + integration), in that order.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.NOTPARALLEL:

VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
RUFF   := $(VENV)/bin/ruff
MYPY   := $(VENV)/bin/mypy
PYTEST_ARGS ?=

.PHONY: help deps services services-down image lint unit integration pytest test bench demo demo-down clean \
	lab lab-down

help:
	@echo "make deps           install Debian packages, consul, .venv (idempotent)"
	@echo "make services       start/reuse Consul, dockerd, OVS; build the test image"
	@echo "make services-down  stop only what 'make services' started"
	@echo "make lint           ruff check + mypy --strict + lint-imports (import contracts)"
	@echo "make unit           unit tests (no services needed)"
	@echo "make integration    integration tests (needs make services)"
	@echo "make test           deps, services, lint, all tests (what CI runs)"
	@echo "make bench          run every bench/*.py (needs make services)"
	@echo "make demo           the end-to-end demo (DEMO_DAEMON=container: the daemon's image)"
	@echo "make demo-down      remove everything the demo made"
	@echo "make lab            the multi-host lab: scripts/lab up (LAB_ARGS='--hosts 4 --no-daemon')"
	@echo "make lab-down       take the lab down (scripts/lab down)"

deps:
	bash scripts/deps.sh

services:
	bash scripts/services.sh

services-down:
	bash scripts/services-down.sh

image:
	bash scripts/image.sh

lint:
	$(RUFF) check .
	$(MYPY) reconciler $(wildcard tests bench/*.py)
	$(VENV)/bin/lint-imports --no-logo

# pytest exits 5 when it collects nothing: that fails the target like any error.
unit:
	$(PYTEST) tests/unit $(PYTEST_ARGS)

integration:
	$(PYTEST) tests/integration $(PYTEST_ARGS)

pytest:
	$(PYTEST) tests $(PYTEST_ARGS)

test:
	$(MAKE) deps
	$(MAKE) services
	$(MAKE) lint
	$(MAKE) pytest

bench:
	@shopt -s nullglob; scripts=(bench/[!_]*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "bench: no bench/*.py yet"; exit 0; fi; \
	failed=(); \
	for s in "$${scripts[@]}"; do \
	  echo "=== bench: $$s"; \
	  $(PY) "$$s" || failed+=("$$s"); \
	done; \
	if [ $${#failed[@]} -gt 0 ]; then echo "bench: FAILED: $${failed[*]}" >&2; exit 1; fi; \
	echo "bench: all $${#scripts[@]} passed"

# The multi-host lab (README "Multi-host lab"): needs `make services` first.
LAB_ARGS ?=
lab:
	bash scripts/lab up $(LAB_ARGS)

lab-down:
	bash scripts/lab down

demo:
	$(MAKE) deps
	$(MAKE) services
	bash scripts/demo.sh up

demo-down:
	bash scripts/demo.sh down

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
