"""The RMT block: x += CPE(x); x += ls1 * MaSA(LN(x)); x += ls2 * ConvFFN(LN(x)), on a channels-last grid."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .conv import ConvFeedForward, DepthwiseConv2d
from .layer_scale import layer_scale as make_layer_scale
from .masa import ManhattanSelfAttention


class RMTBlock(nn.Module):
    """One RMT layer.

    Args:
        dim, num_heads: width and heads of the attention.
        ffn_dim: hidden width of the conv FFN.
        decomposed: MaSAD (rows then columns) instead of MaSA.
        initial_value, heads_range: the per-head decay of this stage.
        layer_scale: initial value of the per-channel LayerScale on both branches, or None for none.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        decomposed: bool = False,
        initial_value: float = 2.0,
        heads_range: float = 4.0,
        layer_scale: float | None = None,
        norm_eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.cpe = DepthwiseConv2d(dim, 3, **kw)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **kw)
        self.attn = ManhattanSelfAttention(
            dim, num_heads, decomposed=decomposed, initial_value=initial_value, heads_range=heads_range, **kw
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **kw)
        self.ffn = ConvFeedForward(dim, ffn_dim, **kw)
        self.ls1 = make_layer_scale(dim, layer_scale, **kw)
        self.ls2 = make_layer_scale(dim, layer_scale, **kw)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, height, width, C) -> (B, height, width, C)."""
        x = x + self.cpe(x)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.ffn(self.norm2(x)))
