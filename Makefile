# Quick start: `make demo` (a live multi-process demonstration) and `make test`.
# Both create the virtual environment they need. PYTHON picks the interpreter;
# VENV the environment (so 3.11 and 3.13 can live side by side); EXTRAS the optional
# dependencies installed with it (CI adds `bindings` on 3.12: both LevelDB bindings).
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= test
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format-check typecheck pytest conformance bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m partydbm demo

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check partydbm tests conformance bench

# Not yet part of `test`: the tree is formatted in one commit of its own first.
format-check: $(STAMP)
	$(BIN)/ruff format --check partydbm tests conformance bench

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest-xdist, one worker more than CPUs (tests/conftest.py); the tests marked heavy
# share one worker.
PYTEST_ARGS ?= -n auto --dist loadgroup --durations=10
# The suite starts a few hundred Python processes: let them keep compiled bytecode (in
# the venv, not the tree) even where the environment says PYTHONDONTWRITEBYTECODE.
PYTEST_ENV := env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache
pytest: $(STAMP)
	$(PYTEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

conformance: $(STAMP)
	$(PYTEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider conformance

bench-quick: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/bench.py --quick

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/bench.py

clean:
	rm -rf .venv .venv310 .venv312 .venv313 *.egg-info .pytest_cache .mypy_cache .ruff_cache
