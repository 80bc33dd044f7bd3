"""retentive's own state-dict keys, written in one place so that a change of the model's layout changes one function."""

from __future__ import annotations

from torch import Tensor


def _retention_keys(
    prefix: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, o: Tensor, *, suffix: str = "weight"
) -> dict[str, Tensor]:
    """The keys of one :class:`MultiScaleRetention` from its five projections (weights, or biases with
    ``suffix="bias"``): W_Q, W_K, W_V, W_G (None without a gate) and W_O are ``q_proj`` ... ``out_proj``."""
    named = {"q_proj": q, "k_proj": k, "v_proj": v, "g_proj": g, "out_proj": o}
    return {f"{prefix}.{name}.{suffix}": t for name, t in named.items() if t is not None}


def block_prefix(i: int) -> str:
    """The key prefix of block ``i`` of :class:`RetNetForCausalLM`."""
    return f"model.retnet.blocks.{i}"


def norm_keys(prefix: str, weight: Tensor, bias: Tensor | None) -> dict[str, Tensor]:
    """A LayerNorm (weight and bias) or an RMSNorm (weight) under ``prefix``."""
    return {f"{prefix}.weight": weight} | ({} if bias is None else {f"{prefix}.bias": bias})
