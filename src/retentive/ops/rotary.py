"""The paper's Theta: an xPos-style rotary rotation at absolute positions (SPEC §1).

Pair (x_2i, x_2i+1) at position n is rotated by n * angle_i with angle_i = 10000^(-i/(dk/2-1)):
(a, b) -> (a cos - b sin, a sin + b cos), i.e. the complex product (a + ib) e^(i n angle_i).
Then q_n . k_m depends on n - m only. Phases are formed in float64 (in float32, positions past 2^16
would lose about 1e-2 rad); the rotation itself runs in float32 (complex64) or float64.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=16)
@torch.inference_mode(False)  # a cached tensor made while decoding must still serve training
def rotary_angles(head_dim: int, device: torch.device | None = None) -> Tensor:
    """angle_i = 10000^(-linspace(0, 1, dk/2)), shape (dk/2,), float64 (float32 where float64 is missing)."""
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dimension, got {head_dim}: use an even dim_model / num_heads")
    dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
    return 10000.0 ** -torch.linspace(0, 1, head_dim // 2, dtype=dtype, device=device)


def rotary_phase(positions: Tensor, head_dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """e^(i n angle_i) for each absolute position n, for rotating tensors of ``dtype``.

    Args:
        positions: (B, T) integer positions
    Returns:
        (B, 1, T, dk/2), complex128 for float64 tensors and complex64 otherwise, ready to broadcast over heads.
    """
    angles = rotary_angles(head_dim, positions.device)
    phase = positions.to(angles.dtype)[:, None, :, None] * angles  # (B, 1, T, dk/2)
    phase = torch.polar(torch.ones_like(phase), phase)
    return phase if dtype == torch.float64 else phase.to(torch.complex64)


def apply_rotary(x: Tensor, phase: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x`` (B, H, T, D) by ``phase`` (B, 1, T, D/2); returns x's shape and dtype."""
    work, complex_work = (
        (torch.float64, torch.complex128) if x.dtype == torch.float64 else (torch.float32, torch.complex64)
    )
    pairs = (x if x.dtype == work else x.to(work)).view(*x.shape[:-1], -1, 2)  # (B, H, T, D/2, 2)
    if pairs.storage_offset() % 2 or (not x.is_contiguous() and any(stride % 2 for stride in pairs.stride()[:-1])):
        pairs = pairs.contiguous()  # a complex view needs even strides; slices of a fused projection have them
    pairs = torch.view_as_complex(pairs)  # (B, H, T, D/2)
    # the dtype checks skip no-op casts: decoding rotates one token per layer, where each op costs microseconds
    y = torch.view_as_real(pairs * (phase if phase.dtype == complex_work else phase.to(complex_work))).flatten(-2)
    return y if y.dtype == x.dtype else y.to(x.dtype)
