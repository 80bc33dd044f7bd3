"""Per-head decay (multi-scale gamma: docs/math.md, Retention, one head), the decay factors of a chunk, and the decay
sums used by the normalizations (docs/math.md, Normalizations).

Everything is kept as ``log(gamma)`` in float32 (float64 for the float64 reference): in bf16 the
gammas collapse to 1.0 and positions past 256 stop being distinct.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .tensor_cache import tensor_cache

SCHEDULES = ("retnet", "linspace")

DecaySpec = str | Sequence[float] | Tensor


def gamma_schedule(schedule: str, num_heads: int) -> Tensor:
    """Per-head decay gamma, shape ``(num_heads,)``, float64.

    ``"retnet"``: gamma_h = 1 - 2^(-5-h) (paper Eq. 8).
    ``"linspace"``: gamma_h = 1 - exp(linspace(ln 1/32, ln 1/512, H)) (paper §3.1, ViR).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    h = torch.arange(num_heads, dtype=torch.float64, device="cpu")
    if schedule == "retnet":
        return 1 - torch.pow(2.0, -5 - h)
    if schedule == "linspace":
        return 1 - torch.exp(
            torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float64, device="cpu")
        )
    raise ValueError(f"decay schedule must be one of {SCHEDULES}, got {schedule!r}")


def log_gamma(decay: DecaySpec, num_heads: int) -> Tensor:
    """``log(gamma)`` per head, shape ``(num_heads,)``, float64 on the CPU.

    Args:
        decay: a schedule name (``"retnet"``, ``"linspace"``) or the gammas themselves, one per head,
            each in (0, 1). Half-precision gammas are refused: they cannot hold 1 - 2^-12.
        num_heads: H, the number of heads the gammas must cover.
    """
    if isinstance(decay, str):
        if decay == "retnet":  # log1p keeps 1 - 2^-(5+h) exact even where float32 would round it to 1
            return torch.log1p(-torch.pow(2.0, -5 - torch.arange(num_heads, dtype=torch.float64, device="cpu")))
        return torch.log(gamma_schedule(decay, num_heads))
    if isinstance(decay, Tensor) and decay.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"decay must be float32 or float64, got {decay.dtype}: gammas near 1 collapse in half precision"
        )
    gamma = torch.as_tensor(decay, dtype=torch.float64, device="cpu").detach()
    if gamma.shape != (num_heads,):
        raise ValueError(f"decay must have one gamma per head, shape ({num_heads},), got {tuple(gamma.shape)}")
    if not bool(((gamma > 0) & (gamma < 1)).all()):
        raise ValueError(f"every gamma in decay must lie in (0, 1), got {gamma.tolist()}")
    return torch.log(gamma)


@tensor_cache(maxsize=64)
def _cached_log_gamma(
    decay: str | tuple[float, ...], num_heads: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    return log_gamma(decay, num_heads).to(device, dtype)


def log_gamma_on(decay: DecaySpec, num_heads: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`log_gamma` moved to ``device`` and ``dtype``; cached for hashable specs (names, tuples),
    which keeps per-token decoding free of this work."""
    if isinstance(decay, str | tuple):
        return _cached_log_gamma(
            decay, num_heads, device if isinstance(device, torch.device) else torch.device(device), dtype
        )
    return log_gamma(decay, num_heads).to(device, dtype)


def decay_powers(log_g: Tensor, exponents: Tensor) -> Tensor:
    """gamma^e as exp(e * log gamma), e >= 0 (never a negative power, which overflows).

    Args:
        log_g: (H,)
        exponents: (...,) non-negative
    Returns:
        (H, ...)
    """
    return torch.exp(log_g.view(-1, *([1] * exponents.dim())) * exponents)


def causal_decay_matrix(log_g: Tensor, length: int) -> Tensor:
    """D_nm = gamma^(n-m) for n >= m, else 0. Returns (H, length, length)."""
    idx = torch.arange(length, device=log_g.device, dtype=log_g.dtype)
    delta = idx[:, None] - idx[None, :]  # (L, L)
    return decay_powers(log_g, delta.clamp(min=0)) * (delta >= 0)


class ChunkDecay(NamedTuple):
    """The decay factors of chunks of C tokens: per head, or per row, head and chunk where documents start inside
    the chunks (:func:`split_documents`)."""

    D: Tensor  # (H, 1, C, C) or (B, H, N, C, C) scale gamma^(j-l) for j >= l, else 0: inside the chunk
    g_in: Tensor  # (H, 1, C, 1) or (B, H, N, C, 1) scale gamma^(j+1): the incoming state -> token j
    g_out: Tensor  # (H, 1, C, 1) or (B, H, N, C, 1) gamma^(C-1-l): token l -> the end of the chunk
    g_chunk: Tensor  # (H, 1) or (B, H, N) gamma^C: across one chunk


def chunk_decay(log_g: Tensor, C: int, scale: float = 1.0) -> ChunkDecay:
    """The factors the chunkwise form multiplies by (:func:`retentive.ops.reference.chunk_pieces`, and both passes
    of :class:`retentive.ops.torch_backend.TorchChunkRetention`).

    The two that multiply q, D and g_in, carry the score scale: it costs nothing there, where scaling q would
    cost a pass over q (and a copy of it kept for the backward pass).
    """
    j = torch.arange(C, device=log_g.device, dtype=log_g.dtype)
    return ChunkDecay(
        causal_decay_matrix(log_g, C)[:, None] * scale,
        decay_powers(log_g, j + 1)[:, None, :, None] * scale,
        decay_powers(log_g, C - 1 - j)[:, None, :, None],
        torch.exp(log_g * C)[:, None],
    )


def split_documents(decay: ChunkDecay, starts: Tensor) -> ChunkDecay:
    """``decay`` for chunks in which documents may start (docs/math.md, Packed documents): every factor that would
    carry a token, or the state entering the chunk, across the first token of a document is 0.

    Args:
        decay: the factors of :func:`chunk_decay`, per head.
        starts: (B, N, C) bool, True on each token that starts a document.
    Returns:
        The factors per row, head and chunk: D (B, H, N, C, C), g_in and g_out (B, H, N, C, 1), g_chunk (B, H, N).
    """
    doc = starts.cumsum(-1)[:, None]  # (B, 1, N, C): documents started in the chunk up to each token
    last = doc[..., -1:]  # (B, 1, N, 1): the chunk's last token's
    return ChunkDecay(
        decay.D * (doc[..., :, None] == doc[..., None, :]),  # token l -> token j within one document
        decay.g_in * (doc == 0)[..., None],  # the state -> tokens before the chunk's first start
        decay.g_out * (doc == last)[..., None],  # tokens of the document still open at the chunk's end -> the state
        decay.g_chunk * (last[..., 0] == 0),  # the state -> past a chunk in which no document starts
    )


def decay_sum(log_g: Tensor, positions: Tensor) -> Tensor:
    """c_n = sum_{m=0..n} gamma^(n-m) = (1 - gamma^(n+1)) / (1 - gamma), at absolute positions n.

    Positions below 0 (left padding) are clamped to 0 so that padded rows stay finite.

    Args:
        log_g: (H,)
        positions: (B, T) integer positions
    Returns:
        (B, H, T)
    """
    n1 = positions.clamp(min=0).to(log_g.dtype)[:, None, :] + 1  # (B, 1, T)
    lg = log_g.view(1, -1, 1)
    return torch.expm1(n1 * lg) / torch.expm1(lg)
