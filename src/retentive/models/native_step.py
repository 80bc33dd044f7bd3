"""The ``"native"`` decoding step: the whole model's step as one call of a hand-written C++ kernel on a CPU.

A small model's step is a read of its weights plus a little arithmetic per token. The ``"aot"`` library still
opens a parallel loop per product and meets at a barrier after each (about 66 a step), allocates its
intermediates and, for two rows and more, calls a product kernel through the proxy executor 29 times. The kernel
here (``ops/cpu/decode_step.cpp``) starts the threads once per step, meets only where a whole vector must be
complete (five barriers per layer), keeps its intermediates in a few buffers, and reads each weight row once for
up to 8 rows of the batch (``ops/cpu/rows.h``); past 16 rows, each thread's share of a product is one call of
ATen's GEMM, which keeps more of the work in registers. A cache's own states are updated in place (nothing
allocated, each byte of the state read and written once); otherwise the new S goes into buffers the step re-uses
(:class:`.decoding.StateBuffers`).

It covers every option of :class:`~.configuration_retnet.RetNetConfig` in float32 on a CPU, for a model made of
the library's own modules. Anything else runs the ``"aot"`` step instead, for the reason :func:`unsupported`
gives: another device or dtype, peft adapters or any projection that is not a plain ``nn.Linear`` (a quantized
one, say), or no C++ compiler (or no Python headers) to build the kernel. Forward hooks on the model's submodules
do not run here (nor in ``"aot"``). The kernel holds the model's own tensors, so a change in place, through
``.data`` or by a load is the one used; a re-assigned parameter (a change of structure) lays the weights out
again.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import MultiScaleRetention, RetNetBlock
from ..layers.feedforward import FeedForward
from ..layers.retention import GATES
from ..ops import RetentionState, cpu_kernels, rotary_angles
from ..ops.decay import log_gamma_on
from . import decoding

if TYPE_CHECKING:
    from .modeling_retnet import RetNetForCausalLM

# an activation function -> its code in decode_step.cpp (enum Activation)
_ACTIVATIONS = {F.gelu: 1, F.relu: 2, F.silu: 3, torch.sigmoid: 4}
_NORMS = {nn.LayerNorm: 1, nn.RMSNorm: 2}  # enum Norm
_HEAD_NORMS = {"none": 0, "groupnorm": 1, "layernorm": 1, "rmsnorm": 2}


def _norm(module: nn.LayerNorm | nn.RMSNorm | None) -> list[Tensor | None]:
    """A norm's weight and bias as the kernel takes them (None where absent)."""
    return [None, None] if module is None else [module.weight, getattr(module, "bias", None)]


def _linear(module: nn.Linear | None) -> list[Tensor | None]:
    """A projection's weight and bias as the kernel takes them (None where absent)."""
    return [None, None] if module is None else [module.weight, module.bias]


def unsupported(lm: RetNetForCausalLM) -> str | None:
    """Why the native kernel cannot compute ``lm``'s step, or None when it can."""
    weight = lm.lm_head.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return f"the kernel runs float32 on the CPU; the model is {weight.dtype} on {weight.device}"
    model = lm.model
    blocks = list(model.retnet.blocks)
    linears = [lm.lm_head]
    for block in blocks:
        if type(block) is not RetNetBlock or type(block.retention) is not MultiScaleRetention or block.scaled:
            return "a block that is not the library's RetNetBlock (or carries a layer scale)"
        ffn = block.ffn
        if type(ffn) is not FeedForward or ffn.act not in _ACTIVATIONS or type(ffn.norm) not in (*_NORMS, type(None)):
            return "an FFN that is not the library's FeedForward"
        linears += [*block.retention.projections, block.ffn.up, block.ffn.down]
        linears += [] if block.ffn.gate is None else [block.ffn.gate]
    if type(model.embed_tokens) is not nn.Embedding or any(type(m) is not nn.Linear for m in linears):
        return "a projection or embedding that is not a plain nn.Linear / nn.Embedding (peft adapters, quantized)"
    norms = [model.retnet.norm, model.embed_norm, *(n for b in blocks for n in (b.norm1, b.norm2))]
    if len({type(n) for n in norms if n is not None}) != 1 or type(model.retnet.norm) not in _NORMS:
        return "block norms of more than one kind, or of a kind the kernel does not know"
    if not cpu_kernels.available():
        return "the kernels could not be built (no C++ compiler, or no Python headers)"
    return None


class NativeStep:
    """One model's native step: the kernel's arguments (weights and options), laid out once per structure of
    the model, and buffers for the new states."""

    def __init__(self, lm: RetNetForCausalLM) -> None:
        self.head, self.version = lm.lm_head.weight, decoding._structure_version
        self.key = _key(self.head)
        self.reason = unsupported(lm)
        if self.reason is None:
            self.kernel = cpu_kernels.decode_step(*_arguments(lm))
        self.buffers = decoding.StateBuffers()
        self.lock = threading.Lock()  # a free buffer set is taken when its views are made: one call at a time

    def __call__(
        self, input_ids: Tensor, states: list[RetentionState], overwrite: bool = False, greedy: bool = False
    ) -> tuple[Tensor, list[RetentionState]]:
        """input_ids (B, 1), one state per layer -> logits (B, 1, V), or with ``greedy`` each row's greedy choice
        (B, 1), and the new states. With ``overwrite``, the new states go over the given ones if these are contiguous
        (the kernel reads each element before it writes it): the same states come back, and nothing is allocated
        for them."""
        S, z, offset = [s.S for s in states], [s.z for s in states], [s.offset for s in states]
        if overwrite:  # in place where every state tensor is contiguous, else into new tensors
            out, *new = self.kernel.step(input_ids, S, z, offset, None, greedy)
            return out, states if new[0][0] is S[0] else list(map(RetentionState, *new))
        with self.lock:
            out, *new = self.kernel.step(input_ids, S, z, offset, self.buffers.take(S), greedy)
        return out, list(map(RetentionState, *new))


def _arguments(lm: RetNetForCausalLM) -> tuple[list[Tensor | None], list[int], list[float]]:
    """The weights, options and scalars as ``decode_step.cpp`` lists them (its enums Global, Layer, Option,
    Scalar)."""
    model = lm.model
    blocks = list(model.retnet.blocks)
    first = blocks[0].retention
    angles = rotary_angles(first.key_dim, torch.device("cpu"), first.rotary_angles, first.rotary_base)
    weights = [
        model.embed_tokens.weight,
        *_norm(model.embed_norm),
        *_norm(model.retnet.norm),
        *_linear(lm.lm_head),
        angles if first.rotary else None,
    ]
    for block in blocks:
        msr, ffn = block.retention, block.ffn
        weights += [
            *_norm(block.norm1),
            *(t for proj in (msr.q_proj, msr.k_proj, msr.v_proj, msr.g_proj, msr.out_proj) for t in _linear(proj)),
            msr.head_norm.weight,
            msr.head_norm.bias,
            log_gamma_on(msr.decay, msr.num_heads, torch.device("cpu"), torch.float32),
            *_norm(block.norm2),
            *_linear(ffn.up),
            *_linear(ffn.gate),
            *_linear(ffn.down),
            *_norm(ffn.norm),
        ]
    norm = blocks[0].norm1
    options = [
        int(type(norm) is nn.RMSNorm),
        _ACTIVATIONS[blocks[0].ffn.act],
        int(blocks[0].ffn.gate is not None),
        _NORMS.get(type(blocks[0].ffn.norm), 0),
        _ACTIVATIONS.get(GATES[first.gate_fn], 0),
        _HEAD_NORMS[first.head_norm.kind],
        int(first.rotary),
        int(first.rotary_layout == "halves"),
        int(first.normalize_decay),
        int(first.normalize_retention),
        int(model.embed_norm is not None),
    ]
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    scalars = [float(eps), float(first.head_norm.eps), float(model.embed_scale or 1.0)]
    return weights, options, scalars


def _key(weight: Tensor) -> tuple[torch.dtype, torch.device]:
    """What a model's steps are laid out for: its weights' dtype and device (``.to()`` changes them in place; a
    re-assigned weight is a change of structure, which ``decoding._structure_version`` counts)."""
    return weight.dtype, weight.device


_NATIVE: weakref.WeakKeyDictionary[RetNetForCausalLM, NativeStep] = weakref.WeakKeyDictionary()


def native_step(
    lm: RetNetForCausalLM,
    input_ids: Tensor,
    states: list[RetentionState],
    overwrite: bool = False,
    greedy: bool = False,
) -> tuple[Tensor, list[RetentionState]]:
    """One decoding step by the native kernel (see the module docstring), or by ``"aot"`` where it does not
    apply. ``overwrite``: write the new S over the given states' (see :class:`.cache_retnet.RetNetCache`);
    ``greedy``: each row's greedy choice (B, 1) in place of the logits. The token ids are checked as
    :meth:`.RetNetModel.forward` checks them: by the kernel, or here before ``"aot"``."""
    step = _NATIVE.get(lm)
    if step is None or step.version != decoding._structure_version or step.key != _key(step.head):
        step = _NATIVE[lm] = NativeStep(lm)  # a change of any module's structure, or of the weights' dtype or device
    if step.reason is not None or states[0].S.dtype != torch.float32:
        lm.model._check_input_ids(input_ids, input_ids.device.type == "cpu")
        logits, states = decoding.aot_step(lm, input_ids, states)
        return decoding.greedy(logits) if greedy else logits, states
    return step(input_ids, states, overwrite, greedy)
