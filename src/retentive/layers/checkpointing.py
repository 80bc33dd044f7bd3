"""Activation checkpointing for a module that runs a list of blocks in turn (the RetNet backbone, an RMT stage).

A block checkpointed keeps only its input during the forward pass and runs again during the backward to rebuild
what its backward reads: the activations of one block are alive at a time instead of every block's, for one more
forward of each such block (docs/architecture.md, "Activation checkpointing"). The attribute names are Hugging
Face's (``gradient_checkpointing``, ``_gradient_checkpointing_func``), so transformers' own switches find them;
:meth:`set_grad_checkpointing` is timm's name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Non-reentrant: gradients reach tensors the block reads besides its input (a carried state, the rotary phases),
# keyword arguments pass through, and the custom autograd Functions of the kernels recompute as they ran.
RECOMPUTE = functools.partial(checkpoint, use_reentrant=False)


class CheckpointedBlocks:
    """Mixin of an ``nn.Module`` whose forward calls :meth:`run_block` for each of its blocks.

    Off by default. On (:meth:`set_grad_checkpointing`), while the module trains with gradients enabled, block
    ``i`` is checkpointed when ``i % checkpoint_every == 0``; in eval mode or under ``torch.no_grad()`` every block
    runs as it is. Dropout draws the same masks in the recomputation (the RNG state is restored), so gradients equal
    those without checkpointing.
    """

    gradient_checkpointing: bool = False
    checkpoint_every: int = 1
    _gradient_checkpointing_func: Callable[..., Any] = RECOMPUTE

    def set_grad_checkpointing(
        self, enable: bool = True, every: int = 1, checkpoint_fn: Callable[..., Any] | None = None
    ) -> None:
        """Checkpoint every ``every``-th block (1: all of them) with ``checkpoint_fn`` (default: non-reentrant
        ``torch.utils.checkpoint.checkpoint``), or none when ``enable`` is False."""
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1 (1 checkpoints every block), got {every!r}")
        self.gradient_checkpointing, self.checkpoint_every = bool(enable), every
        self._gradient_checkpointing_func = checkpoint_fn or RECOMPUTE

    def run_block(self, index: int, block: nn.Module, x: Tensor, **kwargs: Any) -> Any:
        """``block(x, **kwargs)``, checkpointed where :class:`CheckpointedBlocks` says."""
        recompute = self.gradient_checkpointing and index % self.checkpoint_every == 0
        if recompute and self.training and torch.is_grad_enabled():  # type: ignore[attr-defined]
            return self._gradient_checkpointing_func(functools.partial(block, **kwargs), x)
        return block(x, **kwargs)


def set_grad_checkpointing(
    model: nn.Module, enable: bool = True, every: int = 1, checkpoint_fn: Callable[..., Any] | None = None
) -> None:
    """:meth:`CheckpointedBlocks.set_grad_checkpointing` on every stack of blocks inside ``model`` (an RMT's stages
    each count their own blocks)."""
    stacks = [m for m in model.modules() if isinstance(m, CheckpointedBlocks)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} holds no stack of blocks to checkpoint (CheckpointedBlocks)")
    for stack in stacks:
        stack.set_grad_checkpointing(enable, every, checkpoint_fn)


class TransformersCheckpointing:
    """Mixin of a transformers ``PreTrainedModel`` that holds :class:`CheckpointedBlocks`: the hook that its
    ``activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` before transformers 5.25) and
    ``..._disable()`` call, switching every stack inside, every ``every_n_layers``-th block."""

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable | None = None, every_n_layers: int = 1
    ) -> None:
        set_grad_checkpointing(self, enable, every_n_layers, gradient_checkpointing_func)
