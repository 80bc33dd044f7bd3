"""LayerScale (Touvron et al. 2021): a learned per-channel scale on a residual branch."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """y = weight * x, weight (dim,) initialized to ``init_value`` (small, e.g. 1e-5)."""

    def __init__(
        self, dim: int, init_value: float, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.init_value = init_value
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim)."""
        return self.weight * x


def layer_scale(dim: int, init_value: float | None, **kw) -> nn.Module:
    """A :class:`LayerScale`, or the identity when ``init_value`` is None."""
    return nn.Identity() if init_value is None else LayerScale(dim, init_value, **kw)
