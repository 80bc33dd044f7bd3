"""One decoding step of the language model, eager or compiled: ids (B, 1) and the states -> logits and new states.

Decoding costs one step per token, and a step of a small model is a few hundred small PyTorch calls (projections,
rotation, state update, head norm and gate, FFN, for every layer): their dispatch, not the arithmetic, sets its
time. ``config.decode_implementation`` chooses how the step runs:

- ``"eager"`` (default): :func:`decode_logits` as written, the reference; no compiler needed. It writes a cache's
  own states over in place, as ``"native"`` does (below): on a GPU the fused Triton step, whose state is then held
  once rather than twice.
- ``"compiled"``: the same function through ``torch.compile``, once per process and model (on CUDA with CUDA
  graphs, ``mode="reduce-overhead"``). The first step at batch 1 and the first at a larger batch compile (seconds,
  cached on disk by inductor); the second batch size makes the batch dimension symbolic, so later sizes re-use it.
  :func:`warm_up` does both before the first request. The compiled step leaves the given states unchanged, as the
  eager one does.
- ``"aot"``: the same function exported (``torch.export``) and compiled ahead of time by AOTInductor into shared
  libraries that one C++ call runs: none of dynamo's guards, of the runtime wrappers or of the Python wrapper that
  ``"compiled"`` pays every step, which on a CPU cost more than the arithmetic of a small model (docs/benchmarks.md,
  "Decode step"). Two libraries, each compiled at its first use: one for a single row, whose products are plain
  reductions that inductor fuses with everything else into one parallel loop nest (a BLAS matrix-vector product per
  projection costs several times the read of its weights on some CPUs: MKL's generic path on AMD), and one for
  two rows and more (the batch size a dynamic dimension; in float32 on a CPU, the products a kernel of ours that
  reads each weight row once for up to 8 rows: :mod:`retentive.ops.cpu_kernels`). The model's weights are inputs
  of the libraries, read from the model at every call, so that a weight changed in place, re-assigned or loaded is
  the one used; a change of structure, dtype or device exports them again. The libraries are kept on disk
  (:func:`aot_cache_dir`), keyed by the exported graph, so a later process only exports (about a second each) and
  loads them. A model carrying
  peft adapters, whose flags (merged, disabled, active) are plain attributes that no export sees change, runs
  ``"compiled"`` instead, whose guards do. The new S of every layer is written into buffers the step re-uses
  once nobody holds a view of them (:class:`StateBuffers`), so the given states stay unchanged here too.
- ``"native"``: the whole step as one call of a hand-written C++ kernel, one parallel region per token, in float32
  on a CPU (:mod:`.native_step`); ``"aot"`` where it does not apply (another dtype or device, adapters). It
  writes a cache's own states (those an earlier step of the cache made) over in place, as
  :class:`~.cache_retnet.RetNetCache` says; given states it leaves unchanged, as the others do.

All four are reached through the public cached forward, ``lm(ids, cache=cache, use_cache=True)``, and so through
``generate()`` and the server. :func:`~retentive.models.cache_retnet.export_decode_step` traces the model's general
path instead (the short way is skipped while ``torch.export`` or ``torch.compile`` trace a caller): the exported
program is itself a compiled artifact.
"""

from __future__ import annotations

import hashlib
import threading
import time
import types
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..ops import RetentionState, cpu_kernels

if TYPE_CHECKING:
    from .modeling_retnet import RetNetForCausalLM

DECODE_IMPLEMENTATIONS = ("eager", "compiled", "aot", "native")

Step = Callable[["RetNetForCausalLM", Tensor, list[RetentionState]], tuple[Tensor, list[RetentionState]]]


def decode_logits(
    lm: RetNetForCausalLM, input_ids: Tensor, states: list[RetentionState], overwrite: bool = False
) -> tuple[Tensor, list[RetentionState]]:
    """One token per row through the embedding, every block's recurrent step and the head.

    input_ids: (B, 1); states: one RetentionState per layer, whose S and z the new ones may go over with
    ``overwrite``. Returns logits (B, 1, V) and the new states.
    """
    h, states = lm.model.retnet.step(lm.model._embed(input_ids), states, overwrite)  # h: (B, 1, d)
    return lm.lm_head(h), states


def eager_step(
    lm: RetNetForCausalLM, input_ids: Tensor, states: list[RetentionState], overwrite: bool = False
) -> tuple[Tensor, list[RetentionState]]:
    """:func:`decode_logits` in inference mode (no autograd bookkeeping on any op)."""
    with torch.inference_mode():
        return decode_logits(lm, input_ids, states, overwrite)


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


_STEPS: dict[tuple[str, bool, bool], Step] = {}  # (implementation, overwrite, greedy) -> step: a lookup per token


def step_for(kind: str, overwrite: bool = False, greedy: bool = False) -> Step:
    """The step a ``config.decode_implementation`` names; with ``overwrite``, one that may write the new states over
    the given ones (see :class:`.cache_retnet.RetNetCache`); with ``greedy``, one that returns each row's greedy
    choice (B, 1) in place of the logits (the native kernel takes it where it writes the logits)."""
    step = _STEPS.get((kind, overwrite, greedy))
    if step is None:
        step = _STEPS[kind, overwrite, greedy] = _make_step(kind, overwrite, greedy)
    return step


def _make_step(kind: str, overwrite: bool, greedy: bool) -> Step:
    if kind == "native":
        from .native_step import native_step  # it builds on this module

        return partial(native_step, overwrite=overwrite, greedy=greedy)
    steps = {"eager": partial(eager_step, overwrite=overwrite), "compiled": compiled_step, "aot": aot_step}
    if kind not in steps:
        raise ValueError(f"decode_implementation must be one of {DECODE_IMPLEMENTATIONS}, got {kind!r}")
    return partial(_choose, steps[kind]) if greedy else steps[kind]


def _choose(step: Step, lm: RetNetForCausalLM, input_ids: Tensor, states: list[RetentionState]):
    """``step``, with each row's greedy choice (B, 1) in place of its logits."""
    logits, states = step(lm, input_ids, states)
    return greedy(logits), states


def greedy(logits: Tensor) -> Tensor:
    """The greedy choice, ``logits.argmax(-1)``: logits (..., V) -> ids (...), by :func:`argmax_for`."""
    return argmax_for(logits)(logits)


def argmax_for(logits: Tensor) -> Callable[[Tensor], Tensor]:
    """``argmax(-1)`` for logits of the dtype and device of ``logits``: for float32 on a CPU, where a step has
    loaded the kernels (none is built for this), their loop (:func:`.cpu_kernels.argmax`: 16 µs right after a step
    at one row of 4,096 logits and 31 at 16 rows, where torch's reduction costs 37 and 82); else torch's."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and cpu_kernels.loaded():
        return cpu_kernels.argmax
    return _torch_argmax


def _torch_argmax(logits: Tensor) -> Tensor:
    return logits.argmax(-1)


def aot_cache_dir() -> Path:
    """Where the ``"aot"`` step's compiled libraries are kept: ``$RETENTIVE_CACHE_DIR/decode``, by default
    ``~/.cache/retentive/decode``."""
    return cpu_kernels.cache_root() / "decode"


# structural changes of any module (a submodule, parameter or buffer registered: peft adapters injected, a layer
# replaced) bump this count, which every "aot" step compares with the one it last checked its model at: one integer
# comparison per call instead of a walk over the model
_structure_version = 0


def _structure_changed(*_args: object) -> None:
    global _structure_version
    _structure_version += 1


nn.modules.module.register_module_module_registration_hook(_structure_changed)
nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
nn.modules.module.register_module_buffer_registration_hook(_structure_changed)


class _ExportedStep(nn.Module):
    """:func:`decode_logits` as a function of flat tensors, for ``torch.export``: the model's parameters and
    buffers (inputs, not constants: the library reads the model's own at every call), the ids, the states, and
    buffers that take every layer's new S (written in place: see :class:`StateBuffers`). Returns the logits and
    every layer's new z and offset."""

    def __init__(self, lm: RetNetForCausalLM, names: list[str]) -> None:
        super().__init__()
        self.lm, self.names = (lm,), names  # in a tuple: not a submodule, so none of its tensors is a constant

    def forward(
        self,
        tensors: list[Tensor],
        input_ids: Tensor,
        S: list[Tensor],
        z: list[Tensor],
        offset: list[Tensor],
        new_S: list[Tensor],
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        lm = self.lm[0]
        states = [RetentionState(*layer) for layer in zip(S, z, offset, strict=True)]
        named = dict(zip(self.names, tensors, strict=True))
        with torch.nn.utils.stateless._reparametrize_module(lm, named, tie_weights=True):
            logits, states = decode_logits(lm, input_ids, states)
        for buffer, state in zip(new_S, states, strict=True):
            buffer.copy_(state.S)
        return logits, [s.z for s in states], [s.offset for s in states]


class StateBuffers:
    """Memory for the new S of every layer, re-used once nobody holds it any more.

    A step that allocates its new states gets fresh pages from the system at every token once they are large
    (glibc maps blocks of 128 KiB and more anew): the first write to each page then costs a page fault, which at
    batch 8 and more weighs as much as the state update itself. So each step writes its new S into one of a few
    buffer sets kept here and returns views of them; a set is written again only when no view of it is left (the
    storage's use count), whatever the caller did with the states: kept them, sliced them, passed them on.
    """

    kept = 4  # buffer sets: the caller's current states, the ones it just replaced, and room for a prompt cache

    def __init__(self) -> None:
        self.sets: list[list[Tensor]] = []

    def take(self, like: list[Tensor]) -> list[Tensor]:
        """A free set shaped as ``like`` (one S per layer), or a new one; the most recently taken come last."""
        for i, buffers in enumerate(self.sets):
            if buffers[0].shape == like[0].shape and buffers[0].dtype == like[0].dtype and _free(buffers):
                self.sets.append(self.sets.pop(i))
                return buffers
        buffers = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
        self.sets = [*self.sets[-(self.kept - 1) :], buffers]
        return buffers


def _free(buffers: list[Tensor]) -> bool:
    """No tensor but ``buffers`` themselves uses their memory (a view handed out keeps it taken)."""
    return all(torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2 for t in buffers)  # + the temporary


class AotStep:
    """One model's ``"aot"`` step: its compiled libraries (for one row, for more), and where the model's tensors
    live.

    ``slots`` lists (module, "_parameters" or "_buffers", name) for every tensor, so that a call reads the current
    tensors in a few microseconds (``lm.parameters()`` walks the model: tens of microseconds)."""

    def __init__(self, lm: RetNetForCausalLM, key: tuple) -> None:
        self.key, self.version = key, _structure_version  # (weights' dtype and device, states' dtype)
        self.names, self.slots, self.peft = _tensor_slots(lm)
        self.loaders: dict[bool, object] = {}  # one row or not -> the library's loader, compiled at first use
        self.buffers = StateBuffers()
        self.lock = threading.Lock()  # a free buffer set is taken when its views are made: one call at a time

    def fits(self, lm: RetNetForCausalLM, key: tuple) -> bool:
        """Whether this step still computes ``lm``'s: the same dtypes and device, and, once any module anywhere
        changed its structure since the last look, the same tensors in the same places (a walk over the model)."""
        if key != self.key:
            return False
        if self.version != _structure_version:
            _, slots, peft = _tensor_slots(lm)
            if (slots, peft) != (self.slots, self.peft):
                return False
            self.version = _structure_version  # some other module changed, not this model
        return True

    def tensors(self) -> list[Tensor]:
        return [getattr(module, kind)[name] for module, kind, name in self.slots]

    def __call__(
        self, lm: RetNetForCausalLM, input_ids: Tensor, states: list[RetentionState]
    ) -> tuple[Tensor, list[RetentionState]]:
        S, z, offset = ([getattr(s, field).contiguous() for s in states] for field in ("S", "z", "offset"))
        L = len(states)  # out: logits, then every layer's z, every layer's offset
        single = input_ids.shape[0] == 1
        with self.lock:
            loader = self.loaders.get(single)
            if loader is None:
                loader = self.loaders[single] = _compile_aot(lm, self, self.key[-1], single)
            new_S = self.buffers.take(S)
            ids = input_ids.to(torch.long).contiguous()  # the library reads int64 ids, whatever the caller's type
            out = loader.boxed_run([*self.tensors(), ids, *S, *z, *offset, *new_S])
            return out[0], [RetentionState(new_S[i].view_as(new_S[i]), out[1 + i], out[1 + L + i]) for i in range(L)]


def _tensor_slots(lm: nn.Module) -> tuple[list[str], list[tuple[nn.Module, str, str]], bool]:
    """Every parameter and buffer of ``lm`` once (tied ones under their first name): names and slots (see
    :class:`AotStep`); and whether ``lm`` carries peft adapters."""
    slots: dict[int, tuple] = {}
    peft = False
    for prefix, module in lm.named_modules(remove_duplicate=False):
        peft = peft or type(module).__module__.startswith("peft.")
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is not None and id(t) not in slots:
                    slots[id(t)] = (f"{prefix}.{name}" if prefix else name, (module, kind, name))
    return [name for name, _ in slots.values()], [slot for _, slot in slots.values()], peft


def _compile_aot(lm: RetNetForCausalLM, step: AotStep, state_dtype: torch.dtype, single: bool):
    """Export the step for one row (static shapes) or for two rows and more (a dynamic dimension) and compile it,
    or load the library compiled for the same graph earlier; returns its loader (``boxed_run(flat inputs) -> flat
    outputs``)."""
    batch = 1 if single else 2
    states = _empty_states(lm, batch, state_dtype)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=lm.lm_head.weight.device)
    eager_step(lm, ids, states)  # fills the caches of constants (log gamma, rotary angles), as for "compiled"
    S = [s.S for s in states]
    args = (step.tensors(), ids, S, [s.z for s in states], [s.offset for s in states], [t.clone() for t in S])
    dynamic = None
    if not single:
        rows = torch.export.Dim("batch", min=2)
        layers = [{0: rows}] * len(states)
        dynamic = ([None] * len(step.names), {0: rows}, layers, layers, layers, layers)
    linear = _linear_by_rows if single else _linear_then_bias
    with torch.no_grad():
        program = torch.export.export(_ExportedStep(lm, step.names), args, dynamic_shapes=dynamic)
        program = program.run_decompositions({torch.ops.aten.linear.default: linear})
    path = cpu_kernels.build_once(
        aot_cache_dir() / f"{_program_digest(program)}.pt2",
        lambda partial: torch._inductor.aoti_compile_and_package(
            program, package_path=str(partial), inductor_configs=_INDUCTOR
        ),
    )
    return torch._inductor.aoti_load_package(str(path)).loader


# log gamma per head is a constant of the exported graph: inlined as scalars, inductor would evaluate exp() of it in
# the state update's innermost loop, once per element (the state kernels took twice as long); kept as a tensor, its
# exp is one small loop per step
_INDUCTOR = {"always_keep_tensor_constants": True}


def _linear_then_bias(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` as a product, then the bias as an addition that inductor fuses into the next kernel (a GELU,
    a residual): as one ``addmm`` the bias is first expanded and copied into the output, two more calls per
    product on the CPU (inductor unfuses it only on GPUs). In float32 on a CPU the product is the few-rows kernel
    (:mod:`retentive.ops.cpu_kernels`), which hands more than 16 rows to a GEMM itself."""
    if x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and cpu_kernels.available():
        y = cpu_kernels.linear_rows(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    else:
        y = torch.matmul(x, weight.t())
    return y if bias is None else y + bias


def _linear_by_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` of one row as a reduction over each row of the weight: inductor writes it as a vectorized loop
    parallel over the weight's rows, in the same loop nest as the step's other kernels, at the cost of a read of the
    weight (a BLAS matrix-vector product costs up to 5x that on some CPUs: docs/benchmarks.md, "Decode step").
    x: (..., K) with one row; weight: (N, K) -> (..., N)."""
    y = (x.unsqueeze(-2) * weight).sum(-1)
    return y if bias is None else y + bias


def _program_digest(program: torch.export.ExportedProgram) -> str:
    """A name for the library compiled from ``program``: its graph, the shapes, dtypes and strides of its
    inputs, its constants' values (baked into the library), the compiler's options, torch's version and the CPU's
    vector instructions."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    digest = hashlib.sha256()
    parts = (torch.__version__, str(pick_vec_isa()), repr(sorted(_INDUCTOR.items())), program.graph_module.code)
    for part in (*parts, str(program.graph_signature)):
        digest.update(part.encode())
    for node in program.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, Tensor):
            digest.update(f"{node.name}{tuple(value.shape)}{value.stride()}{value.dtype}{value.device}".encode())
    for name, value in sorted(program.constants.items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


_AOT: weakref.WeakKeyDictionary[RetNetForCausalLM, AotStep] = weakref.WeakKeyDictionary()


def aot_step(
    lm: RetNetForCausalLM, input_ids: Tensor, states: list[RetentionState]
) -> tuple[Tensor, list[RetentionState]]:
    """:func:`decode_logits` compiled ahead of time (see the module docstring): exported and compiled at the first
    call, or loaded from disk; again after a change of the model's structure, dtype or device."""
    weight = lm.lm_head.weight
    step, key = _AOT.get(lm), (weight.dtype, weight.device, states[0].S.dtype)
    if step is None or not step.fits(lm, key):
        step = _AOT[lm] = AotStep(lm, key)
    if step.peft:
        return compiled_step(lm, input_ids, states)  # adapters switch by attributes that only dynamo guards on
    return step(lm, input_ids, states)


def warm_up(lm: RetNetForCausalLM, batch_sizes: Sequence[int] = (1, 2)) -> float:
    """Run one step at each batch size on empty states, so that compiling happens now and not at the first
    request; returns the seconds it took. With the default sizes, every later batch size re-uses the compiled
    code (``"compiled"``: the second size makes the batch dimension symbolic; ``"aot"``: the library for two rows
    and more)."""
    device, dtype = lm.lm_head.weight.device, torch.promote_types(lm.lm_head.weight.dtype, torch.float32)
    step = step_for(lm.config.decode_implementation)
    start = time.perf_counter()
    for batch in batch_sizes:
        step(lm, torch.zeros(batch, 1, dtype=torch.long, device=device), _empty_states(lm, batch, dtype))
    return time.perf_counter() - start


def _empty_states(lm: RetNetForCausalLM, batch: int, dtype: torch.dtype) -> list[RetentionState]:
    """Every layer's state before any token, ``batch`` rows, on the model's device."""
    config = lm.config
    dk, dv = config.head_dims
    return [
        RetentionState.zeros(batch, config.num_heads, dk, dv, device=lm.lm_head.weight.device, dtype=dtype)
        for _ in range(config.num_layers)
    ]
