# labelmill: one entry point for everything a developer or CI runs.
#   make demo     start the local stack and classify sample photographs
#   make test     lint, types and the whole test suite against real servers
#   make up/down  start/stop the local stack (Redis, S3, model server, workers, Flower, browse)
#   make screenshot  the README picture of a job page (after make demo)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STACK_DIR ?= .stack
SOURCE ?=
PYTEST_ARGS ?=

.PHONY: help install system-deps tools lock lint format test unit up down demo screenshot proto bench clean

help:
	@grep -E '^#   make' Makefile | sed 's/^#   //'

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "labelmill needs Python >= 3.11"'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[serving,flower,browse,cluster,dev]'
	touch $(STAMP)

install: $(STAMP) system-deps

# Tools whose dependencies would clash with the project's (checkov pins its
# own boto3), in a venv of their own; uv compiles the image lock files.
TOOLS := .venv-tools
$(TOOLS)/.installed:
	test -d $(TOOLS) || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip
	$(TOOLS)/bin/pip install --quiet checkov==3.3.30 uv==0.13.9
	touch $@

tools: $(TOOLS)/.installed

LOCK := $(TOOLS)/bin/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --no-header
lock: $(TOOLS)/.installed
	$(LOCK) --extra flower --extra browse -o deploy/requirements/worker.txt
	$(LOCK) --extra serving -o deploy/requirements/export.txt

# Redis, and Chromium for the browser tests, come from the system package
# manager (see README: Development).
SYSTEM_PACKAGES := redis-server chromium
system-deps:
	@missing=""; for cmd in $(SYSTEM_PACKAGES); do command -v $$cmd >/dev/null || missing="$$missing $$cmd"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing:$$missing: sudo apt-get install$$missing (Debian/Ubuntu)"; exit 2; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy bench  # scripts, not a package: checked on their own (bench/serving.py is no `serving`)
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install tools lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

up: install
	$(BIN)/python -m labelmill.dev.stack up --dir $(STACK_DIR) $(if $(filter 1,$(BF16)),--bf16)

down:
	$(BIN)/python -m labelmill.dev.stack down --dir $(STACK_DIR)

demo: install
	$(BIN)/python -m labelmill.dev.demo --dir $(STACK_DIR) $(if $(SOURCE),--source "$(SOURCE)")

# The README's picture of a job's page: after `make demo`, the stack's browse.
screenshot: install
	$(BIN)/python -m labelmill.dev.screenshot --out docs/images/browse.png

proto: $(STAMP)
	$(BIN)/python -m labelmill._proto.generate

bench: install
	rm -f bench/out/summary.jsonl
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/e2e.py --concurrency 2 --rounds 2
	$(BIN)/python bench/first.py
	$(BIN)/python bench/plumbing.py --rounds 3
	$(BIN)/python bench/enqueue.py --rounds 2
	$(BIN)/python bench/incremental.py
	$(BIN)/python bench/browse.py
	$(BIN)/python bench/summary.py

clean:
	rm -rf $(VENV) $(TOOLS) $(STACK_DIR) .pytest_cache .mypy_cache .ruff_cache *.egg-info
