"""The RetNet backbone over embeddings: a stack of RetNet blocks and a final norm."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers import Form, RetNetBlock, positions_of
from ..layers.checkpointing import CheckpointedBlocks
from ..layers.feedforward import make_norm
from ..ops import RetentionState

# The seed repository's (myscience/retnet-pytorch) names of options this library spells as its config does.
SEED_NAMES = {"normalize_attn": "normalize_decay", "normalize_retn": "normalize_retention"}


class RetNet(CheckpointedBlocks, nn.Module):
    """A stack of :class:`RetNetBlock` s and a final norm: (B, T, d) embeddings -> (B, T, d).

    ``set_grad_checkpointing()`` recomputes the blocks' activations in the backward pass instead of keeping them
    (:class:`~retentive.layers.checkpointing.CheckpointedBlocks`).

    The constructor takes the seed repository's arguments, in its order (myscience/retnet-pytorch); the library
    builds it in its config's names with :meth:`from_options`.

    Args:
        num_layer: L, the number of blocks.
        num_heads: H retention heads per block, each with its own gamma.
        dim_model: d.
        dropout: on every residual branch.
        value_factor: dv = value_factor * d / H.
        msr_gate_fn: the retention gate, ``gate_fn``.
        mlp_gate_fn: the FFN activation, ``ffn_activation``.
        mlp_mult: FFN hidden width as a multiple of d (the paper: 2): ``ffn_dim = round(mlp_mult * d)``.
        mlp_bias: biases in the FFN, ``ffn_bias``.
        options: any other option of :meth:`from_options`, in the config's names (``normalize_attn`` and
            ``normalize_retn`` are taken for ``normalize_decay`` and ``normalize_retention``).
    """

    def __init__(
        self,
        num_layer: int,
        num_heads: int,
        dim_model: int,
        dropout: float = 0.0,
        value_factor: int = 2,
        msr_gate_fn: str = "swish",
        mlp_gate_fn: str = "gelu",
        mlp_mult: float = 2,
        mlp_bias: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        if num_layer < 1:
            raise ValueError(f"num_layer must be >= 1, got {num_layer}")
        ffn_dim = round(mlp_mult * dim_model)
        if ffn_dim < 1:
            raise ValueError(f"mlp_mult * dim_model must be >= 1, got {mlp_mult} * {dim_model}")
        options = {SEED_NAMES.get(name, name): value for name, value in options.items()}
        self._build(
            num_layer,
            num_heads,
            dim_model,
            ffn_dim,
            dropout=dropout,
            value_factor=value_factor,
            gate_fn=msr_gate_fn,
            ffn_activation=mlp_gate_fn,
            ffn_bias=mlp_bias,
            **options,
        )

    @classmethod
    def from_options(cls, num_layers: int, num_heads: int, dim_model: int, ffn_dim: int, **options: Any) -> RetNet:
        """The backbone in the config's names: ``options`` are those of :class:`RetNetBlock` and
        :class:`MultiScaleRetention` (``dropout``, ``gate_fn``, ``ffn_activation``, ``normalize_decay``, ...),
        ``norm`` and ``norm_eps`` shape the final norm too; ``device`` and ``dtype`` place the weights."""
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._build(num_layers, num_heads, dim_model, ffn_dim, **options)
        return net

    def _build(
        self,
        num_layers: int,
        num_heads: int,
        dim_model: int,
        ffn_dim: int,
        *,
        dropout: float = 0.0,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        kw = {"norm": norm, "norm_eps": norm_eps, "device": device, "dtype": dtype}
        block = dict(dropout=dropout, **kw, **options)
        self.blocks = nn.ModuleList(RetNetBlock(dim_model, num_heads, ffn_dim, **block) for _ in range(num_layers))
        self.norm = make_norm(norm, dim_model, norm_eps, device=device, dtype=dtype)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def forward(
        self,
        x: Tensor,
        *form_args: Any,
        state: list[RetentionState] | None = None,
        padding_mask: Tensor | None = None,
        starts: Tensor | None = None,
        return_state: bool = False,
        hidden_states: list[Tensor] | None = None,
        depth: int | None = None,
        **form_kwargs: Any,
    ) -> Tensor | tuple[Tensor, list[RetentionState]]:
        """x: (B, T, d) embeddings -> (B, T, d), and each block's state if ``return_state``. Each block's input
        (B, T, d) is appended to ``hidden_states`` if it is a list: the embeddings first, the output of the last
        block but one last. ``depth`` runs only the first ``depth`` blocks (``state`` then holds as many) and
        returns the last one's output as it is, without the final norm: the taps of timm's
        ``forward_intermediates``.

        The form is resolved here, once for every block, by :meth:`Form.resolve` from ``form_args`` and
        ``form_kwargs``: the seed repository's ``attn_mask, num_chunks, normalize_attn, normalize_retn`` (in this
        order; ``num_chunks=k`` is the chunkwise form) and ``mode``, ``chunk_size``. ``state`` continues a stream,
        one entry per block. ``starts`` (B, T) bool marks the first token of each document packed into a row
        (:meth:`MultiScaleRetention.forward`). One token after a state, without gradients, takes :meth:`decode_step`.
        """
        form = Form.resolve(x, *form_args, **form_kwargs)
        if depth is not None and not (isinstance(depth, int) and 1 <= depth <= self.num_layers):
            raise ValueError(f"depth must be an integer from 1 to num_layers ({self.num_layers}), got {depth!r}")
        blocks = self.blocks if depth is None else self.blocks[:depth]
        if state is not None and len(state) != len(blocks):
            at = "" if depth is None else f" at depth {depth}"
            raise ValueError(f"state must hold one RetentionState per block ({len(blocks)}{at}), got {len(state)}")
        decoding = form.steps_one_token(x) and state is not None and return_state and padding_mask is None
        decoding = decoding and hidden_states is None and starts is None and depth is None
        if decoding and not (self.training or torch.is_grad_enabled()):
            return self.decode_step(x, state)
        first = self.blocks[0].retention
        rotary = None
        if first.rotary:  # every layer rotates the same positions: form the phases once
            rotary = first.rotary_phase(positions_of(x, state and state[0], padding_mask, starts), x.dtype)
        new_state = []
        for i, block in enumerate(blocks):
            if hidden_states is not None:
                hidden_states.append(x)
            x = self.run_block(
                i,
                block,
                x,
                form=form,
                state=None if state is None else state[i],
                padding_mask=padding_mask,
                starts=starts,
                rotary=rotary,
                return_state=return_state,
            )
            if return_state:
                x, s = x
                new_state.append(s)
        if depth is None:
            x = self.norm(x)
        return (x, new_state) if return_state else x

    def decode_step(
        self, x: Tensor, state: list[RetentionState], overwrite: bool = False
    ) -> tuple[Tensor, list[RetentionState]]:
        """One token through every block in the recurrent form, without gradients, in eval mode: what
        ``forward(x, mode="recurrent", state=state, return_state=True)`` computes, in the fewest ops.

        x: (B, 1, d) embeddings; state: one RetentionState per block, left as it is unless ``overwrite`` (then
        each new S and z may go over the given one: for states nobody reads again). Returns (B, 1, d) and the new
        states. They are inference tensors (``torch.inference_mode`` spares every op its autograd bookkeeping):
        clone a state to backpropagate through it later.
        """
        with torch.inference_mode():
            return self.step(x, state, overwrite)

    def step(
        self, x: Tensor, state: list[RetentionState], overwrite: bool = False
    ) -> tuple[Tensor, list[RetentionState]]:
        """:meth:`decode_step` without entering inference mode: the per-token math alone, which
        :mod:`retentive.models.decoding` compiles (a compiled region cannot switch inference mode on)."""
        first = self.blocks[0].retention
        rotary = first.rotary_phase(state[0].offset[:, None], x.dtype) if first.rotary else None
        new_state = []
        for block, s in zip(self.blocks, state, strict=True):
            x, s = block.decode_step(x, s, rotary, overwrite)
            new_state.append(s)
        return self.norm(x), new_state
