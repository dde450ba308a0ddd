# `make test` and `make demo` create the environment on first use (.venv), then run.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: env test test-all demo clean-env

env: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: env
	$(BIN)/python -m pytest -q

test-all: env
	$(BIN)/python -m pytest -q -m ""

demo: env
	$(BIN)/python scripts/demo.py

clean-env:
	rm -rf $(VENV)
