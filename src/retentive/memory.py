"""What a trained RetNet remembers: each head's decay, its horizon, and how far back its state reaches for a text.

Retention's state after T tokens is S_T = Σ_n γ^(T-1-n) k_nᵀ v_n (docs/math.md): token n enters it with the weight
γ^d, d = T-1-n tokens back. A head's **horizon** is the distance at which that weight falls below 1%,
ceil(ln 0.01 / ln γ). For a given text, the **share** of the tokens at distances in [a, b) is their part of the sum of
the contributions' norms, Σ γ^d ||k_n|| ||v_n|| (the Frobenius norm of k_nᵀ v_n is ||k_n|| ||v_n||, and the
rotation leaves ||k_n|| as it is): what the state of each head holds from how far back, by the text's own keys and
values. (The contributions are not orthogonal, so the shares split their total size, not ||S_T|| itself.)

``retentive inspect RUN [--text T]`` prints both; :func:`heads` and :func:`state_shares` return them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .models import RetNetForCausalLM
from .ops import log_gamma

DISTANCES = (16, 256, 4096)  # the edges of the distance buckets: 0-15, 16-255, 256-4095, 4096 and more


@dataclass
class Head:
    """One retention head: its layer, its index, γ and its horizon (tokens until γ^d < 1%)."""

    layer: int
    head: int
    gamma: float
    horizon: int


def horizon(gamma: float, weight: float = 0.01) -> int:
    """The smallest distance d at which γ^d < ``weight``."""
    return math.floor(math.log(weight) / math.log(gamma)) + 1


def heads(lm: RetNetForCausalLM) -> list[Head]:
    """Every head of every layer with its γ and horizon, from the model's decay spec."""
    out = []
    for i, block in enumerate(lm.model.retnet.blocks):
        retention = block.retention
        gammas = log_gamma(retention.decay, retention.num_heads).exp().tolist()
        out += [Head(i, h, g, horizon(g)) for h, g in enumerate(gammas)]
    return out


@torch.no_grad()
def state_shares(lm: RetNetForCausalLM, input_ids: Tensor, edges: Sequence[int] = DISTANCES) -> Tensor:
    """The share of each head's state after ``input_ids`` (1, T) held by the tokens in each distance bucket.

    Returns (L, H, len(edges) + 1), each row summing to 1: buckets [0, edges[0]), [edges[0], edges[1]), ...,
    [edges[-1], ∞) of distance back from the last token. The keys and values are the projections' outputs in one
    parallel forward (hooks on ``k_proj`` and ``v_proj``, so adapters are included).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one text, shape (1, T), got {tuple(input_ids.shape)}")
    blocks = lm.model.retnet.blocks
    captured: dict[tuple[int, str], Tensor] = {}
    hooks = [
        getattr(block.retention, name).register_forward_hook(
            lambda module, args, out, key=(i, name): captured.__setitem__(key, out)
        )
        for i, block in enumerate(blocks)
        for name in ("k_proj", "v_proj")
    ]
    try:
        lm(input_ids, mode="parallel", use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    T = input_ids.shape[1]
    distance = torch.arange(T - 1, -1, -1, dtype=torch.float64)  # (T,): token n is T-1-n back
    bucket = torch.bucketize(distance, torch.tensor(edges, dtype=torch.float64), right=True)  # (T,)
    shares = []
    for i, block in enumerate(blocks):
        H = block.retention.num_heads
        k_norm = captured[i, "k_proj"][0].double().view(T, H, -1).norm(dim=-1)  # (T, H)
        v_norm = captured[i, "v_proj"][0].double().view(T, H, -1).norm(dim=-1)
        log_g = log_gamma(block.retention.decay, H)  # (H,)
        weight = torch.exp(distance[:, None] * log_g) * k_norm * v_norm  # (T, H): γ^d ||k_n|| ||v_n||
        per_bucket = torch.zeros(len(edges) + 1, H, dtype=torch.float64).index_add_(0, bucket, weight)
        shares.append((per_bucket / per_bucket.sum(0)).t())  # (H, buckets)
    return torch.stack(shares).float()


def bucket_names(edges: Sequence[int] = DISTANCES) -> list[str]:
    """'0-15', '16-255', ..., '4096+' for ``edges`` (16, 256, 4096)."""
    bounds = [0, *edges]
    return [f"{a}-{b - 1}" for a, b in itertools.pairwise(bounds)] + [f"{bounds[-1]}+"]
