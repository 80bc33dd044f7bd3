"""The RetNet block (pre-norm): Y = X + MSR(LN(X)); X' = Y + FFN(LN(Y)); LN is a LayerNorm or an RMSNorm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import RetentionState
from .feedforward import FeedForward, make_norm
from .layer_scale import layer_scale as make_layer_scale
from .retention import MultiScaleRetention


class RetNetBlock(nn.Module):
    """One RetNet layer.

    Args:
        dim_model, num_heads, value_factor, gate_fn: as in :class:`MultiScaleRetention`; msr_bias: its ``bias``.
        ffn_dim: hidden width of the FFN; ffn_activation: see :class:`FeedForward`.
        dropout: on each residual branch (and in the FFN).
        norm_eps: epsilon of the block's norms.
        norm: the block's two norms, ``"layernorm"`` (paper) or ``"rmsnorm"`` (torchscale from 2023-09-28).
        ffn_norm: the FFN's hidden norm, ``"none"`` | ``"layernorm"`` | ``"rmsnorm"`` (see :class:`FeedForward`).
        layer_scale: initial value of a per-channel LayerScale on both branches (ViR), or None for none.
        msr_kwargs: further options of :class:`MultiScaleRetention`.
    """

    def __init__(
        self,
        dim_model: int,
        num_heads: int,
        ffn_dim: int,
        *,
        value_factor: int = 2,
        gate_fn: str = "swish",
        ffn_activation: str = "gelu",
        ffn_bias: bool = True,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        layer_scale: float | None = None,
        norm: str = "layernorm",
        ffn_norm: str = "none",
        msr_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **msr_kwargs,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = make_norm(norm, dim_model, norm_eps, **kw)
        self.retention = MultiScaleRetention(
            dim_model, num_heads, gate_fn, value_factor, bias=msr_bias, **msr_kwargs, **kw
        )
        self.norm2 = make_norm(norm, dim_model, norm_eps, **kw)
        self.ffn = FeedForward(
            dim_model, ffn_dim, ffn_activation, ffn_bias, dropout, hidden_norm=ffn_norm, norm_eps=norm_eps, **kw
        )
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # no dropout op per decoded token
        self.ls1 = make_layer_scale(dim_model, layer_scale, **kw)
        self.ls2 = make_layer_scale(dim_model, layer_scale, **kw)
        self.scaled = layer_scale is not None  # decode_step() skips the identity modules: it runs per token and layer

    def forward(
        self, x: Tensor, *, state: RetentionState | None = None, return_state: bool = False, **retention_kwargs
    ) -> Tensor | tuple[Tensor, RetentionState]:
        """x: (B, T, d) -> (B, T, d); ``retention_kwargs`` (``form=``, or the arguments that choose it, and the
        rotation ``rotary``) go to :meth:`MultiScaleRetention.forward`."""
        h = self.norm1(x)
        if return_state:
            y, new_state = self.retention(h, state=state, return_state=True, **retention_kwargs)
        else:
            y = self.retention(h, state=state, **retention_kwargs)
        x = x + self.dropout(self.ls1(y))
        x = x + self.dropout(self.ls2(self.ffn(self.norm2(x))))
        return (x, new_state) if return_state else x

    def decode_step(
        self, x: Tensor, state: RetentionState, rotary: Tensor | None, overwrite: bool = False
    ) -> tuple[Tensor, RetentionState]:
        """One token in the recurrent form, without gradients and in eval mode (no dropout): x (B, 1, d) ->
        (B, 1, d) and the new state; see :meth:`MultiScaleRetention.decode_step`."""
        y, state = self.retention.decode_step(self.norm1(x), state, rotary, overwrite)
        x = x + (self.ls1(y) if self.scaled else y)
        y = self.ffn(self.norm2(x))
        return x + (self.ls2(y) if self.scaled else y), state
