"""The paper's Theta: an xPos-style rotary rotation at absolute positions (SPEC §1).

Pair (x_2i, x_2i+1) at position n is rotated by n * angle_i with angle_i = 10000^(-i/(dk/2-1)).
Then q_n . k_m depends on n - m only. Angles are formed in float64 (positions past 2^16 in float32
would lose about 1e-2 rad) and the rotation runs in the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_angles(head_dim: int, device: torch.device | None = None) -> Tensor:
    """angle_i = 10000^(-linspace(0, 1, dk/2)), shape (dk/2,), float64."""
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dimension, got {head_dim}: use an even dim_model / num_heads")
    return 10000.0 ** -torch.linspace(0, 1, head_dim // 2, dtype=torch.float64, device=device)


def rotary_cos_sin(positions: Tensor, head_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of n * angle_i for each position.

    Args:
        positions: (B, T) integer absolute positions
    Returns:
        cos, sin: (B, 1, T, dk/2) in ``dtype``, ready to broadcast over heads.
    """
    float64_ok = positions.device.type != "mps"
    angle_dtype = torch.float64 if float64_ok else torch.float32
    angles = rotary_angles(head_dim, positions.device).to(angle_dtype)
    phase = positions.to(angle_dtype)[:, None, :, None] * angles  # (B, 1, T, dk/2)
    return phase.cos().to(dtype), phase.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs: (a, b) -> (a cos - b sin, a sin + b cos).

    Args:
        x: (B, H, T, D), D even
        cos, sin: (B, 1, T, D/2)
    Returns:
        (B, H, T, D)
    """
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, D/2) each
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
