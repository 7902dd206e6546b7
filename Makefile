# The two commands of the README: `make demo` and `make test`.  Both bootstrap .venv on a
# fresh machine (Python 3.11+ with venv is all they assume).  `make demo` installs only what
# the demo runs (the package and its runtime dependencies); `make test` adds the dev and
# notebook extras (pytest, ruff, mypy, Playwright, JupyterLab, pandas, ...).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.installed-base
FULL   := $(VENV)/.installed-full

.PHONY: demo test lint typecheck pytest venv clean lab-clean benchmarks

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(BASE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(BASE)

$(FULL): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,notebook]'
	touch $(BASE) $(FULL)

venv: $(FULL)

demo: $(BASE)
	$(BIN)/p2plab demo

lint: $(FULL)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(FULL)
	$(BIN)/mypy p2plab/core

# Four test processes on a two-core machine: most tests wait on sockets, timers and child
# processes, so more processes than cores keeps both cores busy.  The kernel lab's tests and
# the browser's run one at a time each (tests/conftest.py).  PYTEST_JOBS=0 runs serially.
PYTEST_JOBS ?= 4

pytest: $(FULL)
	$(BIN)/pytest -q -ra -n $(PYTEST_JOBS) $(PYTEST_ARGS)

test: lint typecheck pytest

lab-clean: $(BASE)
	$(BIN)/p2plab lab clean

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
