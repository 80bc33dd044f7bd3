"""Position-wise feed-forward network: plain (gelu, relu, swish) or gated (glu, geglu, swiglu)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name -> (activation, gated): a gated FFN computes act(x W_gate) * (x W_up) before W_down
ACTIVATIONS = {
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
    "swish": (F.silu, False),
    "glu": (torch.sigmoid, True),
    "geglu": (F.gelu, True),
    "swiglu": (F.silu, True),
}


class FeedForward(nn.Module):
    """FFN(x) = W_down act(W_up x), or W_down (act(W_gate x) * W_up x) when gated.

    Args:
        dim_model: d.
        hidden_dim: width of the hidden layer (the paper: 2d).
        activation: one of ``ACTIVATIONS``.
        bias: biases in the linear layers.
        dropout: on the hidden activations.
    """

    def __init__(
        self,
        dim_model: int,
        hidden_dim: int,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        self.act, gated = ACTIVATIONS[activation]
        kw = {"device": device, "dtype": dtype}
        self.up = nn.Linear(dim_model, hidden_dim, bias=bias, **kw)
        self.gate = nn.Linear(dim_model, hidden_dim, bias=bias, **kw) if gated else None
        self.down = nn.Linear(hidden_dim, dim_model, bias=bias, **kw)
        self.dropout = nn.Dropout(dropout) if dropout else None  # not even an identity call per decoded token

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        h = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)  # (B, T, hidden)
        return self.down(h if self.dropout is None else self.dropout(h))
