"""AdamW with weight decay on matrices only, and a linear warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW with decay on every parameter of 2 or more dimensions (weights, embeddings), none on biases and norms.

    Args:
        model: the model.
        lr: peak learning rate.
        weight_decay: applied to the 2-D+ parameters (the paper: 0.05).
        betas, eps: Adam's (the paper: betas (0.9, 0.98)).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in params) or None  # the fused kernel on GPU; the default elsewhere
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """The learning-rate multiplier at ``step``: linear from 1/warmup to 1, then cosine down to ``min_lr_ratio``.

    Args:
        step: the optimizer step about to be taken (0-based).
        warmup_steps: steps of linear warm-up.
        total_steps: the step at which the cosine reaches ``min_lr_ratio``.
        min_lr_ratio: the final learning rate as a fraction of the peak.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int | Callable[[], int],
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine`; its state (the step) goes into checkpoints.

    ``total_steps`` may be a callable, read at every step: a run fitted to a time budget learns its length
    while it trains (:class:`~retentive.training.Trainer`).
    """
    total = total_steps if callable(total_steps) else lambda: total_steps
    if warmup_steps < 0 or total() < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total()}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total(), min_lr_ratio)
    )
