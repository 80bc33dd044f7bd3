"""Gated multi-scale retention (MSR): MSR(X) = (gate(X W_G) ⊙ HeadNorm(retention)) W_O (docs/math.md, "The layer")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import (
    ROTARY_ANGLES,
    ROTARY_LAYOUTS,
    RetentionState,
    apply_rotary,
    decode_step,
    document_positions,
    log_gamma,
    retention,
    rotary_phase,
)
from ..ops.decay import DecaySpec
from .form import Form
from .gated_norm import FUSED_GATES, gated_head_norm

GATES = {"swish": F.silu, "silu": F.silu, "gelu": F.gelu, "none": None}
HEAD_NORMS = ("groupnorm", "rmsnorm", "layernorm", "none")


class HeadNorm(nn.Module):
    """Normalize each head's Dv features per token.

    ``groupnorm``: GroupNorm with one group per head (paper), learnable per-channel affine.
    ``rmsnorm``: RMS per head, no affine (later torchscale). ``layernorm``: per head, no affine.
    ``none``: identity (ViR).
    ``weight``: give ``rmsnorm`` or ``layernorm`` a learnable per-channel weight, no bias (flash-linear-attention).
    """

    def __init__(
        self,
        kind: str,
        num_heads: int,
        head_dim: int,
        eps: float = 1e-6,
        *,
        weight: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind not in HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {HEAD_NORMS}, got {kind!r}")
        if weight and kind not in ("rmsnorm", "layernorm"):
            raise ValueError(f"a head norm weight needs head_norm 'rmsnorm' or 'layernorm', got {kind!r}")
        self.kind, self.eps, self.head_dim = kind, eps, head_dim
        self.weight = self.bias = None
        if kind == "groupnorm" or weight:
            self.weight = nn.Parameter(torch.ones(num_heads * head_dim, device=device, dtype=dtype))
        if kind == "groupnorm":
            self.bias = nn.Parameter(torch.zeros(num_heads * head_dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, H, Dv) -> (B, T, H * Dv)."""
        if self.kind == "rmsnorm":
            x = F.rms_norm(x, (self.head_dim,), eps=self.eps)
        elif self.kind in ("groupnorm", "layernorm"):  # per-head layer_norm: F.group_norm's CPU backward is slower
            x = F.layer_norm(x, (self.head_dim,), eps=self.eps)
        x = x.flatten(-2)  # (B, T, H * Dv)
        if self.bias is not None:
            return torch.addcmul(self.bias, x, self.weight)
        return x if self.weight is None else x * self.weight

    def gated(self, o: Tensor, g: Tensor | None, gate_fn: str) -> Tensor:
        """gate(g) ⊙ HeadNorm(o): o (B, H, T, Dv), g (B, T, H * Dv) or None -> (B, T, H * Dv).

        While gradients are recorded, the mean-centering norms with a swish or gelu gate run as one autograd
        node that stores a third of the activations (:mod:`.gated_norm`).
        """
        if (
            g is not None
            and torch.is_grad_enabled()
            and self.kind in ("groupnorm", "layernorm")
            and (self.weight is None) == (self.bias is None)  # the fused node takes both or neither
            and gate_fn in FUSED_GATES
        ):
            return gated_head_norm(o, g, self.weight, self.bias, gate_fn, self.eps)
        y = self(o.transpose(1, 2))
        return y if g is None else GATES[gate_fn](g) * y


class MultiScaleRetention(nn.Module):
    """Multi-scale retention with a gate, a norm per head, and an output projection.

    Args:
        dim_model: d, the model width; dk = d / num_heads per head.
        num_heads: H; each head has its own decay gamma.
        gate_fn: ``"swish"`` (paper), ``"gelu"`` (the seed repository, myscience/retnet-pytorch) or ``"none"``
            (no gate, ViR).
        value_factor: W_V, W_G map d -> value_factor * d; dv = value_factor * d / H.
        head_norm: ``"groupnorm"`` | ``"rmsnorm"`` | ``"layernorm"`` | ``"none"``.
        decay: a schedule (``"retnet"``, ``"linspace"``) or one gamma per head.
        rotary: rotate q and k by the paper's Theta at absolute positions.
        bias: biases in the projections.
        normalize_decay, normalize_retention: the decay and retention normalizations (docs/math.md,
            "Normalizations"), used when forward does not say otherwise.
        value_dim: the total value width H * dv when it is not a multiple of d (torchscale's
            ``decoder_value_embed_dim``); None means value_factor * d. Must be a multiple of num_heads.
        head_norm_weight: a learnable per-channel weight on an ``rmsnorm`` or ``layernorm`` head norm.
        head_norm_eps: epsilon of the head norm.
        rotary_layout, rotary_angles, rotary_base: which features pair up and at which angles (see
            :mod:`retentive.ops.rotary`).
    """

    def __init__(
        self,
        dim_model: int,
        num_heads: int,
        gate_fn: str = "swish",
        value_factor: int = 2,
        *,
        head_norm: str = "groupnorm",
        decay: DecaySpec = "retnet",
        rotary: bool = True,
        bias: bool = False,
        normalize_decay: bool = False,
        normalize_retention: bool = False,
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
        if dim_model < 1 or num_heads < 1 or dim_model % num_heads:
            raise ValueError(f"dim_model ({dim_model}) must be a positive multiple of num_heads ({num_heads})")
        if not (isinstance(value_factor, int) and value_factor >= 1):
            raise ValueError(f"value_factor must be an integer >= 1, got {value_factor!r}")
        dv_all = value_factor * dim_model if value_dim is None else value_dim
        if not isinstance(dv_all, int) or dv_all < 1 or dv_all % num_heads:
            raise ValueError(f"value_dim must be a positive multiple of num_heads ({num_heads}), got {value_dim!r}")
        if rotary_layout not in ROTARY_LAYOUTS:
            raise ValueError(f"rotary_layout must be one of {ROTARY_LAYOUTS}, got {rotary_layout!r}")
        if rotary_angles not in ROTARY_ANGLES:
            raise ValueError(f"rotary_angles must be one of {ROTARY_ANGLES}, got {rotary_angles!r}")
        if not rotary_base > 1:
            raise ValueError(f"rotary_base must be > 1, got {rotary_base!r}")
        if gate_fn not in GATES:
            raise ValueError(f"gate_fn must be one of {tuple(GATES)}, got {gate_fn!r}")
        self.dim_model, self.num_heads = dim_model, num_heads
        self.key_dim = dim_model // num_heads  # dk
        self.value_dim = dv_all // num_heads  # dv
        if rotary and self.key_dim % 2:
            raise ValueError(f"rotary needs an even head dim, got dim_model / num_heads = {self.key_dim}")
        self.gate_fn, self.rotary = gate_fn, rotary
        self.rotary_layout, self.rotary_angles, self.rotary_base = rotary_layout, rotary_angles, float(rotary_base)
        self.normalize_decay, self.normalize_retention = normalize_decay, normalize_retention
        # the decay spec (a name or a tuple of float64 gammas) stays out of parameters and buffers, so that
        # .to(bfloat16) cannot collapse it; being hashable, the ops cache its log per device and dtype
        self.decay = decay if isinstance(decay, str) else tuple(log_gamma(decay, num_heads).exp().tolist())
        log_gamma(self.decay, num_heads)  # validate now, not at the first forward

        kw = {"device": device, "dtype": dtype}
        # W_Q, W_K, W_V, W_G and W_O, one nn.Linear each, called as modules in every form: whatever wraps a
        # projection (a LoRA adapter, a quantized Linear, a hook) acts the same in training and in decoding. Four
        # products rather than one fused matmul also leave q, k, v and g tensors of their own, so that what the
        # backward keeps of them pins nothing else and their gradients need no concatenation.
        self.q_proj = nn.Linear(dim_model, dim_model, bias=bias, **kw)
        self.k_proj = nn.Linear(dim_model, dim_model, bias=bias, **kw)
        self.v_proj = nn.Linear(dim_model, dv_all, bias=bias, **kw)
        self.g_proj = nn.Linear(dim_model, dv_all, bias=bias, **kw) if GATES[gate_fn] is not None else None
        self.out_proj = nn.Linear(dv_all, dim_model, bias=bias, **kw)
        self.head_norm = HeadNorm(head_norm, num_heads, self.value_dim, head_norm_eps, weight=head_norm_weight, **kw)
        self.reset_parameters()

    @property
    def projections(self) -> tuple[nn.Module, ...]:
        """W_Q, W_K, W_V, W_G (when there is a gate) and W_O, in this order."""
        gate = () if self.g_proj is None else (self.g_proj,)
        return (self.q_proj, self.k_proj, self.v_proj, *gate, self.out_proj)

    def reset_parameters(self) -> None:
        """Xavier init with gain 2^-1/2 on each of W_Q, W_K, W_V, W_G (torchscale), plain Xavier on W_O."""
        *inputs, output = self.projections
        for proj in inputs:
            nn.init.xavier_uniform_(proj.weight, gain=2**-0.5)
        nn.init.xavier_uniform_(output.weight)
        for proj in self.projections:
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def rotary_phase(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """e^(i n theta) of ``positions`` (B, T) with this layer's angles: (B, 1, T, Dk/2), for tensors of ``dtype``."""
        return rotary_phase(positions, self.key_dim, dtype, angles=self.rotary_angles, base=self.rotary_base)

    def forward(
        self,
        x: Tensor,
        *form_args: Any,
        form: Form | None = None,
        state: RetentionState | None = None,
        padding_mask: Tensor | None = None,
        starts: Tensor | None = None,
        rotary: Tensor | None = None,
        return_state: bool = False,
        **form_kwargs: Any,
    ) -> Tensor | tuple[Tensor, RetentionState]:
        """Apply MSR to ``x`` (B, T, d).

        The form is ``form`` when a stack has resolved it already, else :meth:`Form.resolve` makes it from
        ``form_args`` and ``form_kwargs``: the seed repository's ``attn_mask, num_chunks, normalize_attn,
        normalize_retn`` (in this order) and ``mode``, ``chunk_size``. ``padding_mask`` (B, T), True on real
        tokens, marks left padding: padded tokens add nothing to the state and each row's first real token sits
        at position 0. ``starts`` (B, T) bool marks the first token of each document packed into a row: a
        document reads nothing from before its start, and its positions count from 0 there (causal forms only).
        ``rotary`` (B, 1, T, Dk/2): the rotation e^(i n theta) of these positions, when a caller shares it across
        layers (see :func:`positions_of`). Returns y (B, T, d), and the new state if ``return_state``.
        """
        form = Form.resolve(x, *form_args, **form_kwargs) if form is None else form
        B, T, _ = x.shape
        H, Dk, Dv = self.num_heads, self.key_dim, self.value_dim
        if state is None and padding_mask is not None:
            state = RetentionState.zeros(B, H, Dk, Dv, offset=-left_padding(padding_mask, T), device=x.device)

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H * Dk), twice; (B, T, H * Dv)
        g = None if self.g_proj is None else self.g_proj(x)  # (B, T, H * Dv)
        q, k = (t.view(B, T, H, Dk).transpose(1, 2) for t in (q, k))  # (B, H, T, Dk)
        v = v.view(B, T, H, Dv).transpose(1, 2)  # (B, H, T, Dv)
        if self.rotary:
            if rotary is None:
                rotary = self.rotary_phase(positions_of(x, state, padding_mask, starts), x.dtype)
            q, k = (apply_rotary(t, rotary, self.rotary_layout) for t in (q, k))  # rotary: (B, 1, T, Dk/2)
        if padding_mask is not None:
            keep = padding_mask[:, None, :, None].to(x.dtype)  # (B, 1, T, 1)
            k, v = k * keep, v * keep

        o, new_state = retention(
            q,
            k,
            v,
            self.decay,
            mode=form.mode,
            chunk_size=form.chunk_size,
            state=state,
            causal=form.causal,
            **form.normalizations(self.normalize_decay, self.normalize_retention),
            output_state=return_state,
            starts=starts,
        )
        y = self.head_norm.gated(o, g, self.gate_fn)  # (B, T, H * Dv)
        y = self.out_proj(y)  # (B, T, d)
        return (y, new_state) if return_state else y

    def decode_step(
        self, x: Tensor, state: RetentionState, rotary: Tensor | None, overwrite: bool = False
    ) -> tuple[Tensor, RetentionState]:
        """``forward(x, mode="recurrent", state=state, rotary=rotary, return_state=True)`` for one token, without
        gradients: decoding runs it for every token and layer, so it skips the general path's checks and reshapes.

        Args: x (B, 1, d); state: this layer's state, not modified unless ``overwrite`` (the new S and z may then
        go over it: :func:`~retentive.ops.decode_step`); rotary (B, 1, 1, Dk/2) the phase of this token's position
        (see :func:`positions_of`). Returns y (B, 1, d) and the new state.
        """
        B, H, Dk, Dv = x.shape[0], self.num_heads, self.key_dim, self.value_dim
        q = self.q_proj(x).view(B, H, 1, Dk)  # one token: (B, 1, H * Dk) is already head-major
        k = self.k_proj(x).view(B, H, 1, Dk)
        g = None if self.g_proj is None else self.g_proj(x)  # (B, 1, H * Dv)
        if self.rotary:
            q, k = apply_rotary(q, rotary, self.rotary_layout), apply_rotary(k, rotary, self.rotary_layout)
        o, state = decode_step(
            q,
            k,
            self.v_proj(x).view(B, H, 1, Dv),
            self.decay,
            state,
            scale=Dk**-0.5,
            normalize_decay=self.normalize_decay,
            normalize_retention=self.normalize_retention,
            overwrite=overwrite,
        )
        y = self.head_norm.gated(o, g, self.gate_fn)  # (B, 1, H * Dv)
        return self.out_proj(y), state


def positions_of(
    x: Tensor, state: RetentionState | None, padding_mask: Tensor | None, starts: Tensor | None = None
) -> Tensor:
    """Absolute positions (B, T) of the tokens of ``x`` (B, T, d): after the state, or after the left padding; with
    ``starts`` (B, T) bool, from 0 at each packed document's first token."""
    B, T, _ = x.shape
    if state is not None:
        offset = state.offset
    elif padding_mask is not None:
        offset = -left_padding(padding_mask, T)
    else:
        offset = torch.zeros(B, dtype=torch.long, device=x.device)
    if starts is not None:
        return document_positions(starts, offset)
    return (offset[:, None] + torch.arange(T, device=x.device)).expand(B, T)


def left_padding(padding_mask: Tensor, length: int) -> Tensor:
    """Number of leading pad tokens per row, (B,); refuses masks that are not left padding."""
    if padding_mask.shape[-1] != length or padding_mask.dim() != 2:
        raise ValueError(f"padding_mask must be (batch, {length}), got shape {tuple(padding_mask.shape)}")
    mask = padding_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("padding_mask must be left padding (zeros, then ones in each row): pad prompts on the left")
    return (~mask).sum(-1)
