"""RMT's Manhattan self-attention layer (Fan et al., CVPR 2024): MaSA, or MaSAD when ``decomposed``.

Projections with biases, the rotary shift on the raster index n = y * W + x, the 2-D Manhattan decay
(per-head gamma by stage) and LCE, a 5 x 5 depthwise convolution on V added before the output projection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import apply_rotary, rotary_phase
from ..ops.decay2d import rmt_log_gamma
from ..ops.masa import decomposed_manhattan_attention, manhattan_attention
from .conv import DepthwiseConv2d


class ManhattanSelfAttention(nn.Module):
    """MaSA (``decomposed=False``) or MaSAD (``decomposed=True``) on a channels-last grid.

    Args:
        dim: C, the width; the head dim is C / num_heads (even: the rotary shift rotates pairs).
        num_heads: H, each with its own gamma_h = 1 - 2^-(initial_value + heads_range * h / H).
        decomposed: rows then columns (MaSAD, O(HW(H+W))) instead of the whole grid (MaSA, O((HW)^2)).
        initial_value, heads_range: the decay schedule of this stage.
        lce_kernel: kernel of LCE, the depthwise convolution on V (5 in the paper).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        decomposed: bool = False,
        initial_value: float = 2.0,
        heads_range: float = 4.0,
        lce_kernel: int = 5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads}) with an even head dim")
        kw = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.decomposed = num_heads, dim // num_heads, decomposed
        # ln(gamma) (H,) float64, kept out of buffers so that .to(bfloat16) cannot round it
        self.log_gamma = rmt_log_gamma(num_heads, initial_value, heads_range)
        self.q_proj = nn.Linear(dim, dim, **kw)
        self.k_proj = nn.Linear(dim, dim, **kw)
        self.v_proj = nn.Linear(dim, dim, **kw)
        self.lce = DepthwiseConv2d(dim, lce_kernel, **kw)
        self.out_proj = nn.Linear(dim, dim, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal with gain 2^-2.5 on q, k, v and plain Xavier-normal on the output (official RMT)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_normal_(proj.weight, gain=2**-2.5)
        nn.init.xavier_normal_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, height, width, C) -> (B, height, width, C)."""
        B, height, width, C = x.shape
        N, H, D = height * width, self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k = self.k_proj(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        v = self.v_proj(x)  # (B, height, width, C)
        raster = torch.arange(N, device=x.device)[None]  # (1, N): n = y * width + x
        phase = rotary_phase(raster, D)  # (1, 1, N, D/2)
        q, k = apply_rotary(q, phase), apply_rotary(k, phase)
        attention = decomposed_manhattan_attention if self.decomposed else manhattan_attention
        o = attention(q, k, v.view(B, N, H, D).transpose(1, 2), self.log_gamma, height, width)  # (B, H, N, D)
        o = o.transpose(1, 2).reshape(B, height, width, C)  # (B, height, width, C)
        return self.out_proj(o + self.lce(v))


class MaSA(ManhattanSelfAttention):
    """Manhattan self-attention over the whole grid (see :class:`ManhattanSelfAttention`)."""

    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(dim, num_heads, decomposed=False, **kwargs)


class MaSAD(ManhattanSelfAttention):
    """Decomposed Manhattan self-attention, rows then columns (see :class:`ManhattanSelfAttention`)."""

    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(dim, num_heads, decomposed=True, **kwargs)
