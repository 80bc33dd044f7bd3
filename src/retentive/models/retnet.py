"""The RetNet backbone over embeddings: a stack of RetNet blocks and a final norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import RetNetBlock, positions_of
from ..layers.feedforward import make_norm
from ..ops import RetentionState
from ..ops.decay import DecaySpec


class RetNet(nn.Module):
    """A stack of :class:`RetNetBlock` s. The first arguments are those of the seed repository.

    Args:
        num_layer: L, the number of blocks.
        num_heads: H retention heads per block, each with its own gamma.
        dim_model: d.
        dropout: on every residual branch.
        value_factor: dv = value_factor * d / H.
        msr_gate_fn: the retention gate, ``"swish"`` | ``"gelu"`` | ``"none"``.
        mlp_gate_fn: the FFN activation, ``"gelu"`` | ``"relu"`` | ``"swish"`` | ``"glu"`` | ``"geglu"`` | ``"swiglu"``.
        mlp_mult: FFN hidden width as a multiple of d (the paper: 2).
        mlp_bias: biases in the FFN.
        head_norm, decay, rotary, msr_bias, normalize_attn, normalize_retn: see MultiScaleRetention.
        norm_eps: epsilon of the block and final norms.
        layer_scale: initial value of a per-channel LayerScale on every residual branch (ViR), or None.
        norm: the block and final norms, ``"layernorm"`` or ``"rmsnorm"``; ffn_norm: see :class:`RetNetBlock`.
        value_dim, head_norm_weight, head_norm_eps, rotary_layout, rotary_angles, rotary_base: see
            MultiScaleRetention.
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
        *,
        head_norm: str = "groupnorm",
        decay: DecaySpec = "retnet",
        rotary: bool = True,
        msr_bias: bool = False,
        normalize_attn: bool = False,
        normalize_retn: bool = False,
        norm_eps: float = 1e-5,
        layer_scale: float | None = None,
        norm: str = "layernorm",
        ffn_norm: str = "none",
        value_dim: int | None = None,
        head_norm_weight: bool = False,
        head_norm_eps: float = 1e-6,
        rotary_layout: str = "interleaved",
        rotary_angles: str = "retnet",
        rotary_base: float = 10000.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_layer < 1:
            raise ValueError(f"num_layer must be >= 1, got {num_layer}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        ffn_dim = round(mlp_mult * dim_model)
        if ffn_dim < 1:
            raise ValueError(f"mlp_mult * dim_model must be >= 1, got {mlp_mult} * {dim_model}")
        self.num_layer = num_layer
        self.blocks = nn.ModuleList(
            RetNetBlock(
                dim_model,
                num_heads,
                ffn_dim,
                value_factor=value_factor,
                gate_fn=msr_gate_fn,
                ffn_activation=mlp_gate_fn,
                ffn_bias=mlp_bias,
                dropout=dropout,
                norm_eps=norm_eps,
                layer_scale=layer_scale,
                head_norm=head_norm,
                decay=decay,
                rotary=rotary,
                bias=msr_bias,
                normalize_attn=normalize_attn,
                normalize_retn=normalize_retn,
                norm=norm,
                ffn_norm=ffn_norm,
                value_dim=value_dim,
                head_norm_weight=head_norm_weight,
                head_norm_eps=head_norm_eps,
                rotary_layout=rotary_layout,
                rotary_angles=rotary_angles,
                rotary_base=rotary_base,
                device=device,
                dtype=dtype,
            )
            for _ in range(num_layer)
        )
        self.norm = make_norm(norm, dim_model, norm_eps, device=device, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        attn_mask: str | None = "causal",
        num_chunks: int | None = None,
        normalize_attn: bool | None = None,
        normalize_retn: bool | None = None,
        *,
        mode: str | None = None,
        chunk_size: int | None = None,
        state: list[RetentionState] | None = None,
        padding_mask: Tensor | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, list[RetentionState]]:
        """x: (B, T, d) embeddings -> (B, T, d), and each block's state if ``return_state``.

        ``num_chunks=None`` is the parallel form, ``num_chunks=k`` the chunkwise form; or name the form
        with ``mode`` and ``chunk_size``. ``state`` continues a stream, one entry per block.
        """
        if state is not None and len(state) != self.num_layer:
            raise ValueError(f"state must hold one RetentionState per block ({self.num_layer}), got {len(state)}")
        decoding = mode == "recurrent" and x.shape[1] == 1 and state is not None and return_state
        defaults = attn_mask == "causal" and padding_mask is None and (normalize_attn, normalize_retn) == (None, None)
        if decoding and defaults and num_chunks is None and not (self.training or torch.is_grad_enabled()):
            return self.step(x, state)
        kwargs = dict(
            attn_mask=attn_mask,
            num_chunks=num_chunks,
            normalize_attn=normalize_attn,
            normalize_retn=normalize_retn,
            mode=mode,
            chunk_size=chunk_size,
            padding_mask=padding_mask,
            return_state=return_state,
        )
        first = self.blocks[0].retention
        if first.rotary:  # every layer rotates the same positions: form the phases once
            positions = positions_of(x, state and state[0], padding_mask)
            kwargs["rotary"] = first.rotary_phase(positions, x.dtype)
        new_state = []
        for i, block in enumerate(self.blocks):
            x = block(x, state=None if state is None else state[i], **kwargs)
            if return_state:
                x, s = x
                new_state.append(s)
        x = self.norm(x)
        return (x, new_state) if return_state else x

    def step(self, x: Tensor, state: list[RetentionState]) -> tuple[Tensor, list[RetentionState]]:
        """One token through every block in the recurrent form, without gradients, in eval mode: what
        ``forward(x, mode="recurrent", state=state, return_state=True)`` computes, in the fewest ops.

        x: (B, 1, d) embeddings; state: one RetentionState per block. Returns (B, 1, d) and the new states.
        They are inference tensors: under ``torch.inference_mode`` every op costs less bookkeeping, which makes
        a token ~15% faster on a CPU. Clone a state to backpropagate through it later.
        """
        with torch.inference_mode():
            first = self.blocks[0].retention
            rotary = first.rotary_phase(state[0].offset[:, None], x.dtype) if first.rotary else None
            new_state = []
            for block, s in zip(self.blocks, state, strict=True):
                x, s = block.step(x, s, rotary)
                new_state.append(s)
            return self.norm(x), new_state
