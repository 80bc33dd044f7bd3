"""The 2-D Manhattan decay of RMT (Fan et al., CVPR 2024): log D_nm = ln(gamma) * (|x_n - x_m| + |y_n - y_m|).

Tokens of an H x W grid are numbered in raster order, n = y * W + x. The 2-D log-decay is the
Kronecker sum of the 1-D ones along columns (y) and rows (x): log D = log D_y ⊗ 1_W + 1_H ⊗ log D_x,
which is why MaSAD can apply it one axis at a time. Everything stays in log space (additive masks
for softmax logits), computed in float64 and cast by the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rmt_log_gamma(num_heads: int, initial_value: float = 2.0, heads_range: float = 4.0) -> Tensor:
    """Per-head ln(gamma) of RMT: gamma_h = 1 - 2^-(initial_value + heads_range * h / H).

    Args:
        num_heads: H.
        initial_value: the exponent of the first head (the official code uses 2 at every stage).
        heads_range: how far the exponent grows across the heads of a stage (4 to 6 officially).
    Returns:
        (H,) float64, all negative, on the CPU even under a meta-device context (as transformers' from_pretrained
        builds models): a constant the layers hold, not a buffer, that no state dict fills.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if initial_value <= 0 or heads_range < 0:
        raise ValueError(f"need initial_value > 0 and heads_range >= 0, got {initial_value} and {heads_range}")
    h = torch.arange(num_heads, dtype=torch.float64, device="cpu")
    return torch.log1p(-torch.pow(2.0, -(initial_value + heads_range * h / num_heads)))


def log_decay_1d(log_gamma: Tensor, length: int) -> Tensor:
    """ln(gamma) * |i - j| on a line of ``length`` tokens.

    Args:
        log_gamma: (H,) per-head ln(gamma).
        length: L >= 1.
    Returns:
        (H, L, L) in the dtype and device of ``log_gamma``.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    idx = torch.arange(length, device=log_gamma.device, dtype=log_gamma.dtype)
    return log_gamma[:, None, None] * (idx[:, None] - idx[None, :]).abs()  # (H, L, L)


def manhattan_log_decay(log_gamma: Tensor, height: int, width: int) -> Tensor:
    """ln(gamma) * (|x_n - x_m| + |y_n - y_m|) for every pair of tokens of an H x W grid, raster order.

    Args:
        log_gamma: (heads,) per-head ln(gamma).
        height, width: the grid, each >= 1.
    Returns:
        (heads, height * width, height * width), the additive mask of MaSA.
    """
    if height < 1 or width < 1:
        raise ValueError(f"the grid must be at least 1 x 1, got {height} x {width}")
    y = torch.arange(height, device=log_gamma.device, dtype=log_gamma.dtype).repeat_interleave(width)  # (HW,)
    x = torch.arange(width, device=log_gamma.device, dtype=log_gamma.dtype).repeat(height)  # (HW,)
    distance = (y[:, None] - y[None, :]).abs() + (x[:, None] - x[None, :]).abs()  # (HW, HW)
    return log_gamma[:, None, None] * distance
