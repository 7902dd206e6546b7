# The two commands of the README: `make demo` and `make test`.  Both bootstrap .venv on a
# fresh machine (Python 3.11+ with venv is all they assume).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest venv clean lab-clean benchmarks

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,notebook]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/p2plab demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy p2plab/core

pytest: $(STAMP)
	$(BIN)/pytest -q -ra $(PYTEST_ARGS)

test: lint typecheck pytest

lab-clean: $(STAMP)
	$(BIN)/p2plab lab clean

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
