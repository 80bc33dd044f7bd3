"""Position-wise feed-forward network: plain (gelu, relu, swish) or gated (glu, reglu, geglu, swiglu)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name -> (activation, gated): a gated FFN computes act(x W_gate) * (x W_up) before W_down
# (torchscale's GLU, act(fc1 x) * gate x, is this with W_gate = fc1 and W_up = its "gate")
ACTIVATIONS = {
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
    "swish": (F.silu, False),
    "glu": (torch.sigmoid, True),
    "reglu": (F.relu, True),
    "geglu": (F.gelu, True),
    "swiglu": (F.silu, True),
}


HIDDEN_NORMS = ("none", "layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, eps: float, **kw) -> nn.Module:
    """``"layernorm"`` (weight and bias) or ``"rmsnorm"`` (weight) over the last ``dim`` features."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, **kw)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, **kw)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class FeedForward(nn.Module):
    """FFN(x) = W_down N(act(W_up x)), or W_down N(act(W_gate x) * W_up x) when gated; N is the hidden norm.

    Args:
        dim_model: d.
        hidden_dim: width of the hidden layer (the paper: 2d).
        activation: one of ``ACTIVATIONS``.
        bias: biases in the linear layers.
        dropout: on the hidden activations.
        hidden_norm: ``"none"``, or a ``"layernorm"`` | ``"rmsnorm"`` over the hidden activations (torchscale's
            sub-LayerNorm, ``subln``, before 2023-09-28).
        norm_eps: epsilon of the hidden norm.
    """

    def __init__(
        self,
        dim_model: int,
        hidden_dim: int,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        *,
        hidden_norm: str = "none",
        norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        if hidden_norm not in HIDDEN_NORMS:
            raise ValueError(f"hidden_norm must be one of {HIDDEN_NORMS}, got {hidden_norm!r}")
        self.act, gated = ACTIVATIONS[activation]
        kw = {"device": device, "dtype": dtype}
        self.up = nn.Linear(dim_model, hidden_dim, bias=bias, **kw)
        self.gate = nn.Linear(dim_model, hidden_dim, bias=bias, **kw) if gated else None
        self.down = nn.Linear(hidden_dim, dim_model, bias=bias, **kw)
        self.norm = None if hidden_norm == "none" else make_norm(hidden_norm, hidden_dim, norm_eps, **kw)
        self.dropout = nn.Dropout(dropout) if dropout else None  # not even an identity call per decoded token

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        h = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)  # (B, T, hidden)
        h = h if self.dropout is None else self.dropout(h)
        return self.down(h if self.norm is None else self.norm(h))
