"""What every retention kernel shares: decay powers inside a chunk, tile sizes, launch checks.

Decay powers are always exp(delta * log gamma) with delta >= 0 (docs/math.md, Why nothing overflows), and every
power that would belong to a row past the end of a short chunk is set to 0 before use, so no inf ever meets a
masked 0.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_CHUNK = 64  # tokens per chunk the kernels use at most: 64 x 64 score tiles suit the tensor cores
MAX_TILE = 64  # head-dim tile (Dk or Dv) one program holds; larger heads are looped over or split
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (warps, pipelining stages) the chunk kernels are tuned over on a GPU. With 4 warps they spill at dk 256
# on sm_90, with 8 they do not (benchmarks/compile_kernels.py), so 8 comes first: the interpreter takes it.
LAUNCHES = ((8, 2), (8, 3), (4, 2), (8, 1))


def tuned(kernel):
    """Autotune a chunk kernel over LAUNCHES, once per head-dim and tile shape. The chunk kernels only write
    their outputs, so trial runs are harmless. In the interpreter, where timing means nothing, no trials."""
    launches = LAUNCHES[:1] if interpreted() else LAUNCHES
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in launches]
    return triton.autotune(configs=configs, key=["Dk", "Dv", "BC", "BK", "BV", "PRECISION"])(kernel)


@triton.jit
def chunk_decays(log_g, j, length):
    """For local indices j of a chunk with ``length`` valid tokens (j past the end give 0).

    Returns gamma^(j+1) (state -> token j), gamma^(length-1-j) (token j -> chunk end), and
    the causal decay matrix D_jl = gamma^(j-l) for j >= l, else 0.
    """
    valid = j < length
    jf = j.to(tl.float32)
    g_in = tl.where(valid, tl.exp((jf + 1) * log_g), 0.0)
    g_out = tl.where(valid, tl.exp((length - 1 - jf) * log_g), 0.0)
    delta = jf[:, None] - jf[None, :]
    causal = (delta >= 0) & valid[:, None] & valid[None, :]
    D = tl.where(causal, tl.exp(tl.where(causal, delta, 0.0) * log_g), 0.0)
    return g_in, g_out, D


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in float32; PRECISION "upcast" works around Triton 3.9's interpreter, whose
    dot multiplies the raw bits of bfloat16 operands as integers."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


def block_size(dim: int, limit: int = MAX_TILE) -> int:
    """A power-of-two tile >= 16 (the smallest tl.dot operand) covering ``dim`` up to ``limit``."""
    return min(limit, max(16, triton.next_power_of_2(dim)))


def chunk_block(chunk_size: int) -> tuple[int, int]:
    """(tokens per chunk, its power-of-two tile): chunks longer than MAX_CHUNK are cut to MAX_CHUNK.

    Any chunking gives the same retention up to rounding, so this changes no result.
    """
    length = min(chunk_size, MAX_CHUNK)
    return length, max(16, triton.next_power_of_2(length))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs are multiplied in full float32 ("ieee"), not tf32, to keep the 1e-5 tolerance."""
    if dtype == torch.bfloat16 and interpreted():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreted() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_runnable(*tensors: Tensor) -> None:
    """Raise if these tensors cannot go through a Triton kernel here."""
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton kernels take {KERNEL_DTYPES}, got {t.dtype}: use backend='torch'")
        if not t.is_cuda and not interpreted():
            raise ValueError(
                f"the Triton kernels need CUDA tensors, got a tensor on {t.device}: move it to a GPU, use "
                "backend='torch', or set TRITON_INTERPRET=1 before importing triton to run them on the CPU"
            )
