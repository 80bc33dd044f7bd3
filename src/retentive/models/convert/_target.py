"""retentive's own state-dict keys, written in one place so that a change of the model's layout changes one function."""

from __future__ import annotations

import torch
from torch import Tensor


def _retention_keys(
    prefix: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, o: Tensor, *, suffix: str = "weight"
) -> dict[str, Tensor]:
    """The keys of one :class:`MultiScaleRetention` from its five projections (weights, or biases with
    ``suffix="bias"``): W_Q, W_K, W_V, W_G (None without a gate) are the rows of ``in_proj``, W_O is ``out_proj``."""
    rows = [q, k, v] if g is None else [q, k, v, g]
    return {f"{prefix}.in_proj.{suffix}": torch.cat(rows, dim=0), f"{prefix}.out_proj.{suffix}": o}


def block_prefix(i: int) -> str:
    """The key prefix of block ``i`` of :class:`RetNetForCausalLM`."""
    return f"model.retnet.blocks.{i}"


def norm_keys(prefix: str, weight: Tensor, bias: Tensor | None) -> dict[str, Tensor]:
    """A LayerNorm (weight and bias) or an RMSNorm (weight) under ``prefix``."""
    return {f"{prefix}.weight": weight} | ({} if bias is None else {f"{prefix}.bias": bias})
