"""An exponential moving average of a model's weights (Polyak averaging; timm's ``ModelEma``)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn


class ModelEMA:
    """A copy of ``model`` whose weights follow the model's: ``ema = decay * ema + (1 - decay) * weights`` after
    every :meth:`update` (buffers too; integer buffers, such as counters, are copied).

    It starts from the model's weights when it is made; evaluated, it usually scores above the weights of the last
    step. The copy is in eval mode and needs no gradients.

    Args:
        model: the model, on the device where the average is kept.
        decay: in (0, 1); timm's ImageNet recipes use 0.9998, with tens of thousands of steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1) (0 turns the average off), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return list(itertools.chain(model.parameters(), model.buffers()))  # tied weights once

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s weights (the model it was made from)."""
        for average, value in zip(self._tensors(self.module), self._tensors(model), strict=True):
            if average.is_floating_point():
                average.lerp_(value.detach(), 1 - self.decay)
            else:
                average.copy_(value)

    def save(self, path: Path) -> None:
        save_model(self.module, str(path), metadata={"format": "pt", "decay": str(self.decay)})

    def load(self, path: Path) -> None:
        load_model(self.module, str(path))  # copied into the average's tensors, on their device
