# `make demo` and `make test` set everything up themselves on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed before the project so pip keeps it instead of pulling another build; on a GPU machine
# pick the build for your CUDA, e.g. TORCH_SPEC="torch==2.13.0" with PIP_INDEX_URL set for cu12x.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_DISABLE_PROGRESS_BARS := 1

.PHONY: install demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[worker,datasets,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m joycap_queue.ops.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Test processes side by side (pytest-xdist); each starts its own redis-server and tiny model.
# worksteal: the long end-to-end tests would otherwise leave one process idle at the end.
TEST_WORKERS ?= 2

test: lint typecheck
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
