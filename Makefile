# Two commands on a fresh machine with Python 3.11+ and make: `make dev` and `make test`.
# Both create .venv on first use and reinstall the project whenever pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Touched after a successful install; older than pyproject.toml means "install again".
STAMP  := $(VENV)/.installed
# Extra options for `python -m bench`, e.g. make bench BENCH_ARGS="--videos 3".
BENCH_ARGS ?=

# Recipes (and the test suite's shutil.which("temporal")) find the venv's console
# scripts, temporal and temporal-test-server among them, without activating it.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: dev test lint bench clean

dev: $(STAMP)
	$(BIN)/python -m workers.dev

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# One throwaway stack of its own (fresh data dir, free ports): every figure next to a
# baseline measured in the same run, printed as one table.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "orderflow needs Python 3.11+; run with PYTHON=python3.x" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[local,test]'
	@touch $@

# Removes the virtualenv and caches; keeps .data (the dev stack's orders).
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
