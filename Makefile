# make up    : install everything and run the whole suite in one process, with a demo stream
# make test  : install everything and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install up test lint proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/castmesh up $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check castmesh services tests tools
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

proto: $(STAMP)
	$(PY) tools/gen_proto.py

bench: $(STAMP)
	$(VENV)/bin/castmesh bench fanout $(or $(ARGS),--viewers 100 --seconds 20)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
