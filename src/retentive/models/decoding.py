"""One decoding step of the language model, eager or compiled: ids (B, 1) and the states -> logits and new states.

Decoding costs one step per token, and a step of a small model is a few hundred small PyTorch calls (projections,
rotation, state update, head norm and gate, FFN, for every layer): their dispatch, not the arithmetic, sets its
time. ``config.decode_implementation`` chooses how the step runs:

- ``"eager"`` (default): :func:`decode_logits` as written, the reference; no compiler needed.
- ``"compiled"``: the same function through ``torch.compile``, once per process and model (on CUDA with CUDA
  graphs, ``mode="reduce-overhead"``). The first step at batch 1 and the first at a larger batch compile (seconds,
  cached on disk by inductor); the second batch size makes the batch dimension symbolic, so later sizes re-use it.
  :func:`warm_up` does both before the first request. The compiled step leaves the given states unchanged, as the
  eager one does.

Both are reached through the public cached forward, ``lm(ids, cache=cache, use_cache=True)``, and so through
``generate()`` and the server. :func:`~retentive.models.cache_retnet.export_decode_step` traces the model's general
path instead (the short way is skipped while ``torch.export`` or ``torch.compile`` trace a caller): the exported
program is itself a compiled artifact.
"""

from __future__ import annotations

import time
import types
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..ops import RetentionState

if TYPE_CHECKING:
    from .modeling_retnet import RetNetForCausalLM

DECODE_IMPLEMENTATIONS = ("eager", "compiled")

Step = Callable[["RetNetForCausalLM", Tensor, list[RetentionState]], tuple[Tensor, list[RetentionState]]]


def decode_logits(
    lm: RetNetForCausalLM, input_ids: Tensor, states: list[RetentionState]
) -> tuple[Tensor, list[RetentionState]]:
    """One token per row through the embedding, every block's recurrent step and the head.

    input_ids: (B, 1); states: one RetentionState per layer. Returns logits (B, 1, V) and the new states.
    """
    h, states = lm.model.retnet.step(lm.model._embed(input_ids), states)  # h: (B, 1, d)
    return lm.lm_head(h), states


def eager_step(
    lm: RetNetForCausalLM, input_ids: Tensor, states: list[RetentionState]
) -> tuple[Tensor, list[RetentionState]]:
    """:func:`decode_logits` in inference mode (no autograd bookkeeping on any op)."""
    with torch.inference_mode():
        return decode_logits(lm, input_ids, states)


# each model's compiled step: dynamo keeps compiled code (and its budget of 8 recompilations) per code object, so
# every model gets a copy of decode_logits with a code object of its own; a process may then hold any number of them
_COMPILED: weakref.WeakKeyDictionary[RetNetForCausalLM, Step] = weakref.WeakKeyDictionary()


def compiled_decode_logits(lm: RetNetForCausalLM) -> Step:
    """:func:`decode_logits` compiled for ``lm`` (made at the first call, then kept as long as ``lm`` lives)."""
    step = _COMPILED.get(lm)
    if step is None:
        fn = decode_logits
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        mode = "reduce-overhead" if lm.lm_head.weight.is_cuda else None  # on CUDA: replay a CUDA graph per shape
        step = _COMPILED[lm] = torch.compile(own, fullgraph=True, mode=mode)
    return step


def compiled_step(
    lm: RetNetForCausalLM, input_ids: Tensor, states: list[RetentionState]
) -> tuple[Tensor, list[RetentionState]]:
    """:func:`decode_logits` compiled. The compiled code is guarded on its inputs' strides and dispatch keys and on
    the grad and inference modes, so every call is made alike: dense ids, row-major states that are not inference
    tensors (a prefill under ``torch.inference_mode`` gives such states: copied once, at the first step), and
    ``no_grad`` outside inference mode, whatever mode the caller is in (a server's engine runs in inference mode,
    ``generate()`` under ``no_grad``). Otherwise each kind of caller would compile the step again."""
    with torch.inference_mode(False), torch.no_grad():
        input_ids = input_ids.clone(memory_format=torch.contiguous_format)  # generate() passes a column of its ids
        states = [_plain(s) for s in states]
        if input_ids.is_cuda:  # the previous step's outputs are this step's inputs: a new step of CUDA graph trees
            torch.compiler.cudagraph_mark_step_begin()
        if lm not in _COMPILED:  # an eager step first fills the caches of constants (log gamma, rotary angles) that
            eager_step(lm, input_ids, states)  # the compiled code reads: traced empty, they would compile it twice
        logits, states = compiled_decode_logits(lm)(lm, input_ids, states)
    # a CUDA graph's outputs live in its pool until the next replay: the logits may be kept longer (scores)
    return (logits.clone() if logits.is_cuda else logits), states


def _plain(state: RetentionState) -> RetentionState:
    """The state as row-major tensors that are not inference tensors, copied only where it is not so already."""
    tensors = (state.S, state.z, state.offset)
    return RetentionState(*(t if _is_plain(t) else t.clone(memory_format=torch.contiguous_format) for t in tensors))


def _is_plain(t: Tensor) -> bool:
    if t.is_inference():
        return False
    stride, expect = t.stride(), 1
    for dim in range(t.dim() - 1, -1, -1):
        if stride[dim] != expect:
            return False
        expect *= t.shape[dim]
    return True


def step_for(lm: RetNetForCausalLM) -> Step:
    """The step ``lm.config.decode_implementation`` names."""
    kind = lm.config.decode_implementation
    if kind == "eager":
        return eager_step
    if kind == "compiled":
        return compiled_step
    raise ValueError(f"decode_implementation must be one of {DECODE_IMPLEMENTATIONS}, got {kind!r}")


def warm_up(lm: RetNetForCausalLM, batch_sizes: Sequence[int] = (1, 2)) -> float:
    """Run one step at each batch size on empty states, so that compiling happens now and not at the first
    request; returns the seconds it took. With the default sizes, every later batch size re-uses the compiled
    code (the second size makes the batch dimension symbolic)."""
    config, weight = lm.config, lm.lm_head.weight
    (dk, dv), dtype = config.head_dims, torch.promote_types(weight.dtype, torch.float32)
    start = time.perf_counter()
    for batch in batch_sizes:
        states = [
            RetentionState.zeros(batch, config.num_heads, dk, dv, device=weight.device, dtype=dtype)
            for _ in range(config.num_layers)
        ]
        step_for(lm)(lm, torch.zeros(batch, 1, dtype=torch.long, device=weight.device), states)
    return time.perf_counter() - start
