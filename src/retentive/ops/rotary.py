"""The paper's Theta: an xPos-style rotary rotation at absolute positions (docs/math.md, Retention, one head).

A pair of features at position n is rotated by n * angle_i: (a, b) -> (a cos - b sin, a sin + b cos), i.e. the
complex product (a + ib) e^(i n angle_i). Then q_n . k_m depends on n - m only. Two choices tell the sources apart:

- the angles: ``"retnet"`` (torchscale, the paper): angle_i = base^(-i / (dk/2 - 1)), i.e. base^(-linspace(0, 1, dk/2));
  ``"rope"`` (RoFormer, flash-linear-attention): angle_i = base^(-2i / dk).
- the pairs: ``"interleaved"`` (torchscale): (x_2i, x_2i+1); ``"halves"`` (flash-linear-attention):
  (x_i, x_i+dk/2).

Phases are formed in float64 (in float32, positions past 2^16 would lose about 1e-2 rad); the rotation itself runs
in float32 (complex64) or float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tensor_cache import tensor_cache

ROTARY_ANGLES = ("retnet", "rope")
ROTARY_LAYOUTS = ("interleaved", "halves")


@tensor_cache(maxsize=16)
def rotary_angles(
    head_dim: int, device: torch.device | None = None, angles: str = "retnet", base: float = 10000.0
) -> Tensor:
    """angle_i of each pair, shape (dk/2,), float64 (float32 where float64 is missing); see the module docstring."""
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dimension, got {head_dim}: use an even dim_model / num_heads")
    if angles not in ROTARY_ANGLES:
        raise ValueError(f"rotary angles must be one of {ROTARY_ANGLES}, got {angles!r}")
    if not base > 1:
        raise ValueError(f"rotary base must be > 1, got {base!r}")
    dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
    half = head_dim // 2
    if angles == "retnet":
        exponents = torch.linspace(0, 1, half, dtype=dtype, device=device)
    else:
        exponents = torch.arange(half, dtype=dtype, device=device) * (2 / head_dim)
    return base**-exponents


def rotary_phase(
    positions: Tensor,
    head_dim: int,
    dtype: torch.dtype = torch.float64,
    *,
    angles: str = "retnet",
    base: float = 10000.0,
) -> Tensor:
    """e^(i n angle_i) for each absolute position n, for rotating tensors of ``dtype``.

    Args:
        positions: (B, T) integer positions
        angles, base: the angle formula and its base (see the module docstring).
    Returns:
        (B, 1, T, dk/2), complex128 for float64 tensors and complex64 otherwise, ready to broadcast over heads.
        Under ``torch.compile`` the same phase as real (cos, sin) pairs, (B, 1, T, dk/2, 2) float64 or float32:
        inductor generates no code for complex tensors (it would fall back to eager ops, one per layer and token).
    """
    theta = rotary_angles(head_dim, positions.device, angles, float(base))
    phase = positions.to(theta.dtype)[:, None, :, None] * theta  # (B, 1, T, dk/2)
    if torch.compiler.is_compiling():
        pairs = torch.stack((phase.cos(), phase.sin()), dim=-1)
        return pairs if dtype == torch.float64 else pairs.float()
    phase = torch.polar(torch.ones_like(phase), phase)
    return phase if dtype == torch.float64 else phase.to(torch.complex64)


def apply_rotary(x: Tensor, phase: Tensor, layout: str = "interleaved") -> Tensor:
    """Rotate the pairs of ``x`` (B, H, T, D) by ``phase`` (B, 1, T, D/2) complex, or (B, 1, T, D/2, 2) (cos, sin)
    pairs (see :func:`rotary_phase`); returns x's shape and dtype.

    ``layout``: ``"interleaved"`` pairs (x_2i, x_2i+1) or ``"halves"`` pairs (x_i, x_i+D/2).
    """
    if layout not in ROTARY_LAYOUTS:
        raise ValueError(f"rotary layout must be one of {ROTARY_LAYOUTS}, got {layout!r}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_work = x if x.dtype == work else x.to(work)  # the dtype checks skip no-op casts: decoding counts every op
    y = _rotate_complex(x_work, phase, layout) if phase.is_complex() else _rotate_pairs(x_work, phase, layout)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _rotate_complex(x: Tensor, phase: Tensor, layout: str) -> Tensor:
    """The rotation as one complex product: the fewest ops in eager mode."""
    complex_work = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    phase = phase if phase.dtype == complex_work else phase.to(complex_work)
    if layout == "halves":
        first, second = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
        y = torch.complex(first, second) * phase
        return torch.cat((y.real, y.imag), dim=-1)
    pairs = x.view(*x.shape[:-1], -1, 2)  # (B, H, T, D/2, 2)
    if pairs.storage_offset() % 2 or (not x.is_contiguous() and any(stride % 2 for stride in pairs.stride()[:-1])):
        pairs = pairs.contiguous()  # a complex view needs even strides; slices of a fused projection have them
    return torch.view_as_real(torch.view_as_complex(pairs) * phase).flatten(-2)


def _rotate_pairs(x: Tensor, phase: Tensor, layout: str) -> Tensor:
    """The same rotation in real arithmetic, (a, b) -> (a cos - b sin, a sin + b cos): what inductor compiles."""
    cos, sin = phase.to(x.dtype).unbind(-1)  # (B, 1, T, D/2) each
    if layout == "halves":
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
