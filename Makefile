# `make test` and `make demo` create the environment on first use (.venv), then run.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make test-floor`: the text-encoder, tokenizer, manager, checkpoint and offline tests again, in a second venv with
# the lowest transformers setup.py claims (its floor, release .0), so that the floor stays true.
FLOOR_VENV := $(VENV)/floor
TRANSFORMERS_FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' setup.py)
FLOOR_TESTS := tests/test_encoders.py tests/test_tokenizer.py tests/test_embedding_manager.py \
	tests/test_checkpoint.py tests/test_offline.py

.PHONY: env test test-all test-floor demo clean-env

env: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,tensorboard,wandb]"
	touch $(STAMP)

test: env
	$(BIN)/python -m pytest -q

test-all: env
	$(BIN)/python -m pytest -q -m ""

test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(FLOOR_VENV)/bin/python -m pip install --quiet -e . "transformers==$(TRANSFORMERS_FLOOR).0" "pytest>=7"
	# the 4.x-layout test is skipped unless transformers 4 is installed: make sure it is
	$(FLOOR_VENV)/bin/python -c 'import transformers as t; assert t.__version__ == "$(TRANSFORMERS_FLOOR).0", t.__version__'
	$(FLOOR_VENV)/bin/python -m pytest -q $(FLOOR_TESTS)

demo: env
	$(BIN)/python scripts/demo.py

clean-env:
	rm -rf $(VENV)
