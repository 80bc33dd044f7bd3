"""Correctness on hardware: the Triton kernels and the model on CUDA against float64, on fresh random inputs.

The kernels: the chunkwise form forward (o and the final state S, z) and backward (dq, dk, dv and dS0, dz0, the
gradient of a carried state, under random upstream gradients of o, S and z), and the decode step (in place,
``decode_step_``, and through ``retention(mode="recurrent")`` on one token), each against ``backend="torch"`` on
float64 copies of the same inputs (that backend is itself tested against the definition, ``ops/reference.py``).
A covering set of (dtype, dk, dv) rather than their product, since each new one compiles and tunes five kernels:
fp32, bf16 and fp16; dk 64, 128 and 256; dv = dk and 2 dk; T not a multiple of the chunk, batch > 1, normalizations
on and off, a carried state with each row at its own offset. The bf16 backward at dk 64 and 256 guards against the
Hopper miscompile reported in flash-linear-attention issue 640 (a transposed dot result fed into another dot, dk
wrong at a 64-wide K tile; the dk kernel is written so as not to need one). Each case runs first under each launch
the kernels are tuned over (``LAUNCHES``: warps and pipelining stages), every kernel pinned to it, then tuned (the
dry run pins the first two cases only): the tuner keeps the fastest, and a launch Triton miscompiles
(flash-linear-attention had to drop some on Hopper) would be wrong only where it happens to win. A launch that is
wrong or faults goes into the part's ``avoid_launches``, and the parts after this one are tuned without it
(``RETENTIVE_TRITON_LAUNCHES``); after a fault that loses the CUDA context the part ends, leaving its time to them.
The launches the tuner chose are reported. A chunkwise case that fails runs once more, in a child process whose
Triton compiles with the CUDA toolkit's ptxas where that is of another release than Triton's own (Triton 3.6 ships
ptxas 12.8, which flash-linear-attention found to assemble some Hopper kernels wrongly, and 13.x right): a case
wrong under one and right under the other names the assembler, not the kernel. Last, one size whose element offsets
pass 2^31, its last head against float64 on that head alone (heads are independent).

Tolerances, relative to float64 (docs/math.md): 1e-5 in fp32, since ``dot_precision`` multiplies float32 operands
as "ieee", not tf32; 2e-2 in bf16 and fp16, on inputs already rounded, so the error is the kernels' own.

Poisoning: the kernels allocate their outputs, so before each measured run the CUDA caching allocator's free memory
is filled with all-ones bytes (NaN in every float dtype) and kept cached: an element a kernel leaves unwritten reads
NaN, and an error that is NaN or inf never passes. Each kernel runs once before (compiling and tuning), so that the
tuner's own buffers do not land among the poisoned ones.

The model (RetNetForCausalLM, random weights): its three forms in bf16 against the float64 model with the same
rounded weights; greedy ``generate()`` against the parallel forward over the generated sequence (float32, so that
ties are rare; a near tie is allowed); a training step under bf16 autocast against float64, then the same step
through ``torch.compile`` against eager.

Items run in order of importance while the time box allows, each in its own try. The dry run (CPU, Triton's
interpreter) runs them all at tiny sizes but the 2^31 one.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import pkgutil
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from torch import Tensor
from triton.runtime.autotuner import Autotuner

import retentive.ops.triton
from gpucheck.harness import Part, cuda_usable, free_cuda, rel_err
from retentive import RetNetConfig, RetNetForCausalLM
from retentive.ops import RetentionState, gamma_schedule, log_gamma, retention
from retentive.ops.triton import decode_step_
from retentive.ops.triton.common import LAUNCHES

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE = {name: dtype for dtype, name in NAME.items()}
CHECK = Path(__file__).resolve().parents[1] / "gpu_check.py"
CASES_ENV = "GPUCHECK_CHUNKWISE_CASES"  # set by retry_under for its child: the chunkwise cases it runs, as JSON
# bf16 rounds the activations at every layer: the logits of a 2-layer model measure 1.2e-2 against float64, its
# gradients under bf16 autocast 1.7e-2 (on the CPU, the kernels in Triton's interpreter); a wrong form or kernel errs
# at O(1)
FORMS_TOL = 3e-2
AUTOCAST_TOL = 5e-2  # also a compiled step against eager, both under bf16 autocast: their rounding points differ
RECOMPUTE_TOL = 1e-4  # the same step with its blocks recomputed: the same operations again, but for atomics' order
GENERATE_TOL = 1e-4  # float32 decoding steps against the float32 parallel forward
POISON_BYTES = 8 << 30


@dataclass(frozen=True)
class Sizes:
    batch: int
    heads: int
    tokens: int  # T of the kernel checks: not a multiple of the chunk
    chunk: int
    shrink: int  # head dims are divided by this (the interpreter is slow)
    dim_model: int  # the model: 4 heads of dk = dim_model / 4, dv = 2 dk
    vocab: int
    model_tokens: int
    new_tokens: int  # generate()


FULL = Sizes(batch=2, heads=4, tokens=1000, chunk=64, shrink=1, dim_model=512, vocab=4096, model_tokens=300,
             new_tokens=32)  # fmt: skip
DRY = Sizes(batch=2, heads=2, tokens=37, chunk=16, shrink=4, dim_model=128, vocab=256, model_tokens=37, new_tokens=8)


def run(part: Part) -> None:
    s = DRY if part.dry_run else FULL
    torch.manual_seed(0)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

    failed: list[Case] = []  # the chunkwise cases that failed a check or raised

    def kernels(
        dtype: torch.dtype, dk: int, dv: int, normalize: bool, dry_each_launch: bool = False, documents: bool = False
    ) -> tuple:
        """A chunkwise item. On a GPU each launch runs alone first (it costs no compile the tuner would not do, and
        a launch that faults in a case tuned first is not known by name); the dry run does so where asked."""
        case = Case(NAME[dtype], dk, dv, normalize, documents)
        each_launch = dry_each_launch or not part.dry_run

        def check() -> None:
            before = len(part.checks)
            try:
                chunkwise(part, s, dtype, dk, dv, normalize, each_launch, documents)
            except Exception:
                failed.append(case)
                raise
            if not all(c["ok"] for c in part.checks[before:]):
                failed.append(case)

        return 15 + 5 * each_launch, f"chunkwise {case.dtype} dk {dk} dv {dv}{', packed' * documents}", check

    def decode(dtype: torch.dtype, dk: int, dv: int, normalize: bool) -> tuple:
        return 5, f"decode step {NAME[dtype]} dk {dk} dv {dv}", partial(decode_step, part, s, dtype, dk, dv, normalize)

    # (seconds the item needs left in the box, where, what), most important first: one chunk case per dtype before
    # the 2^31 case and torch.compile. Each new (dtype, dk, dv) compiles and tunes five kernels (about 15 s); the
    # model's dk 128, dv 256 reuse those of the bf16 and fp32 cases before it, the 2^31 case those of the first.
    items: list[tuple[float, str, Callable[[], None]]] = [
        kernels(bf16, 64, 64, False, dry_each_launch=True),  # fla issue 640: dk at a 64-wide K tile
        kernels(bf16, 256, 512, True, dry_each_launch=True),  # retnet-1.3b heads
        decode(bf16, 256, 512, True),
        kernels(bf16, 128, 256, False),
        (10, "model forms bf16", partial(model_forms, part, s)),
        (10, "model training step, bf16 autocast", partial(model_step, part, s, compiled=False)),
        kernels(fp32, 128, 256, True),
        kernels(bf16, 128, 256, True, documents=True),  # packed documents: the kernels compiled with HAS_DOCS
        (10, "model generate", partial(model_generate, part, s)),
        (30, "model generate, compiled decoding", partial(model_generate, part, s, "compiled")),
        decode(fp32, 128, 256, True),
        decode(fp16, 64, 128, False),
        kernels(fp16, 64, 128, False),
        (20, "offsets past 2^31", partial(beyond_2_31, part)),
        (45, "model training step, torch.compile", partial(model_step, part, s, compiled=True)),
        kernels(fp16, 256, 256, True),
        kernels(fp32, 256, 256, False),
        # the aot step on CUDA: a library for one row (its products written as reductions) and one for more rows
        (60, "model generate, aot decoding, one row", partial(model_generate, part, s, "aot", rows=1)),
        (60, "model generate, aot decoding", partial(model_generate, part, s, "aot")),
    ]
    if CASES_ENV in os.environ:  # a child under another ptxas (retry_under): these chunkwise cases alone
        cases = map(Case._make, cases_from_env())
        items = [kernels(DTYPE[c.dtype], c.dk, c.dv, c.normalize, True, c.documents) for c in cases]
    elif part.dry_run:
        part.notes.append("dry run: poisoning does nothing on the CPU, whose allocator hands memory back to the system")
    for reserve, where, check in items:
        if part.out_of_time(reserve):
            continue
        try:
            check()
            free_cuda()  # inside: after a CUDA error it raises too, and the next item goes on
        except Exception as e:  # recorded; the other items still run
            part.error(where, e)
            if not cuda_usable():  # nothing after it can run here: the time left goes to the parts after this one
                part.notes.append(f"the CUDA context was lost in {where}: the items after it did not run")
                part.save()
                return
    report_launches(part)
    ptxas = toolkit_ptxas()
    if failed and ptxas and CASES_ENV not in os.environ and not part.out_of_time(40):
        retry_under(part, ptxas, failed)


class Case(NamedTuple):
    """A chunkwise case of the kernel checks."""

    dtype: str  # a key of DTYPE
    dk: int
    dv: int
    normalize: bool
    documents: bool  # rows that pack documents (retention's starts)


def cases_from_env() -> list[list]:
    return json.loads(os.environ[CASES_ENV])


def toolkit_ptxas() -> Path | None:
    """The CUDA toolkit's ptxas, where there is one of another version than the one Triton compiles for Hopper with
    (Triton ships its own: 12.8 in Triton 3.6)."""
    found = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    if not Path(found).is_file():
        return None
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return None
    return Path(found) if version_of(Path(found)) != version_of(Path(get_ptxas(90).path)) else None


def version_of(ptxas: Path) -> str:
    """A ptxas's release, e.g. "12.8"."""
    out = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout
    return out.rsplit("release ", 1)[-1].split(",")[0]


def retry_under(part: Part, ptxas: Path, cases: list[Case]) -> None:
    """Run the chunkwise ``cases`` that failed again, in a child process whose Triton compiles with ``ptxas`` (a
    new compile: Triton's cache keys hold the ptxas version), and add their checks to this part, marked with that
    ptxas's release: a case right under one ptxas and wrong under the other names the assembler, not the kernel."""
    version = version_of(ptxas)
    out = part.out / "ptxas"
    out.mkdir(exist_ok=True)
    env = os.environ | {CASES_ENV: json.dumps(cases), "TRITON_PTXAS_PATH": str(ptxas)}
    env["TRITON_PTXAS_BLACKWELL_PATH"] = str(ptxas)  # the name Triton 3.9 reads for Hopper too
    seconds = part.time_left() - 15
    cmd = [sys.executable, str(CHECK), "--part", "correctness", "--seconds", str(seconds), "--out", str(out)]
    cmd += ["--dry-run"] if part.dry_run else []
    names = ", ".join(f"{c.dtype} dk {c.dk} dv {c.dv}" + " packed" * c.documents for c in cases)
    part.notes.append(
        f"chunkwise cases failed under Triton's own ptxas; run again under the toolkit's, {version}: {names}"
    )
    free_cuda()
    try:
        subprocess.run(cmd, env=env, timeout=seconds + 10, check=False, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        part.notes.append(f"ptxas {version}: the run past its {seconds:.0f} s was stopped; what it saved follows")
    report = out / "part-correctness.json"
    child = json.loads(report.read_text()) if report.exists() else {"checks": [], "notes": ["it saved nothing"]}
    part.checks += [c | {"what": f"ptxas {version}: {c['what']}"} for c in child["checks"]]
    part.notes += [f"ptxas {version}: {note}" for note in child["notes"]]
    part.save()


def tuned_kernels() -> dict[str, Autotuner]:
    """The autotuned kernels of ``retentive.ops.triton``, by name."""
    found = {}
    for info in pkgutil.iter_modules(retentive.ops.triton.__path__):
        module = importlib.import_module(f"retentive.ops.triton.{info.name}")
        found |= {name: obj for name, obj in vars(module).items() if isinstance(obj, Autotuner)}
    return found


@contextmanager
def pinned(warps: int, stages: int) -> Iterator[None]:
    """Every tuned kernel launched with ``warps`` and ``stages`` alone (an autotuner of one config runs it
    untimed); their own configs are restored after."""
    kernels = list(tuned_kernels().values())
    saved = [kernel.configs for kernel in kernels]
    for kernel in kernels:
        kernel.configs = [triton.Config({}, num_warps=warps, num_stages=stages)]
    try:
        yield
    finally:
        for kernel, configs in zip(kernels, saved, strict=True):
            kernel.configs = configs


def report_launches(part: Part) -> None:
    """A table of the launch the tuner chose for each kernel and key (head dims, tiles, precision, dtypes)."""
    chosen = [(name, key, config) for name, kernel in tuned_kernels().items() for key, config in kernel.cache.items()]
    if not chosen:  # the interpreter has one launch: nothing to choose
        return
    add = part.table("Launches the tuner chose", ["kernel", "Dk, Dv, BC, BK, BV, precision, dtypes", "warps, stages"])
    for name, key, config in chosen:
        add([name, ", ".join(map(str, key)), f"{config.num_warps}, {config.num_stages}"])


def poison(device: str, limit: int = POISON_BYTES) -> None:
    """Fill the CUDA caching allocator's free memory (up to ``limit`` bytes) with all-ones bytes, NaN in fp16, bf16,
    fp32 and fp64, and leave it cached: the next tensors allocated read NaN until written. On the CPU, nothing."""
    if device != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # what stays cached after this call is what it poisoned
    size = max(min(limit, torch.cuda.mem_get_info()[0] - (2 << 30)), 0)
    blocks = [torch.empty(size, dtype=torch.uint8, device=device)]  # the pool of tensors over 1 MiB
    blocks += [torch.empty(1 << 20, dtype=torch.uint8, device=device) for _ in range(64)]  # and of the small ones
    for block in blocks:
        block.fill_(255)


def chunkwise(
    part: Part,
    s: Sizes,
    dtype: torch.dtype,
    dk: int,
    dv: int,
    normalize: bool,
    each_launch: bool = False,
    documents: bool = False,
) -> None:
    """The chunkwise kernels forward and backward through a carried state, against float64; ``each_launch``: also
    under each launch of LAUNCHES, every kernel pinned to it (one check each: the worst of the eight outputs);
    ``documents``: rows that pack documents, starting at random (about one token in 40), on a chunk's first token,
    and one of a single token."""
    dev, B, H, T = part.device, s.batch, s.heads, s.tokens
    starts = None
    if documents:
        starts = torch.rand(B, T, device=dev) < 1 / 40
        starts[0, [s.chunk, s.chunk + 5, s.chunk + 6]] = True
    dk, dv = dk // s.shrink, dv // s.shrink
    inputs = [torch.randn(B, H, T, d, device=dev).to(dtype) for d in (dk, dk, dv)]  # q, k (B, H, T, dk), v
    inputs += [torch.randn(B, H, dk, dv, device=dev), torch.randn(B, H, dk, device=dev)]  # S0, z0 float32
    offset = torch.randint(0, 1000, (B,), device=dev)  # each row at its own position
    upstream = [torch.randn(B, H, T, dv, device=dev).to(dtype)]  # of o, in its dtype
    upstream += [torch.randn(B, H, dk, dv, device=dev), torch.randn(B, H, dk, device=dev)]  # of S, z
    kw = dict(mode="chunkwise", chunk_size=s.chunk, output_state=True, normalize_decay=normalize,
              normalize_retention=normalize)  # fmt: skip

    def forward(tensors: list[Tensor], backend: str) -> tuple[list[Tensor], list[Tensor]]:
        """Leaves (q, k, v, S0, z0) and outputs (o, S, z)."""
        q, k, v, S0, z0 = leaves = [t.detach().requires_grad_() for t in tensors]
        state = RetentionState(S0, z0, offset)
        o, state = retention(q, k, v, "retnet", state=state, starts=starts, backend=backend, **kw)
        return leaves, [o, state.S, state.z]

    def backward(leaves: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
        """dq, dk, dv, dS0, dz0."""
        grads = [g.to(o.dtype) for g, o in zip(upstream, outputs, strict=True)]
        return list(torch.autograd.grad(outputs, leaves, grads))

    def poisoned_run() -> list[Tensor]:
        """o, S, z, dq, dk, dv, dS0, dz0 by the Triton kernels, each pass into poisoned memory."""
        poison(dev)
        leaves, outputs = forward(inputs, "triton")
        poison(dev)
        return outputs + backward(leaves, outputs)

    leaves, want = forward([t.double() for t in inputs], "torch")
    want += backward(leaves, want)
    names = ("o", "S", "z", "dq", "dk", "dv", "dS0", "dz0")
    label = f"{NAME[dtype]} dk {dk} dv {dv}, B {B} T {T} chunk {s.chunk}, norms {'on' if normalize else 'off'}"
    label += ", packed documents" * documents
    # each launch alone before the tuner tries them all, so that one that faults is known by name
    for warps, stages in LAUNCHES if each_launch else ():
        what = f"chunkwise pinned to num_warps={warps}, num_stages={stages}, worst of {', '.join(names)}: {label}"
        try:
            with pinned(warps, stages):
                backward(*forward(inputs, "triton"))  # compiles
                errors = {name: rel_err(a, b) for name, a, b in zip(names, poisoned_run(), want, strict=True)}
        except triton.runtime.errors.OutOfResources:  # the tuner skips such a launch too
            part.notes.append(f"{what}: out of resources (shared memory or registers), as the tuner would find")
            continue
        except Exception:
            part.avoid_launches.append([warps, stages])
            raise
        worst = max(names, key=lambda n: errors[n] if math.isfinite(errors[n]) else math.inf)
        if not part.check(what, errors[worst], TOL[dtype], worst=worst, dtype=NAME[dtype], dk=dk, dv=dv, T=T):
            part.avoid_launches.append([warps, stages])
            part.save()
    backward(*forward(inputs, "triton"))  # compiles and tunes: the tuner's buffers are not poisoned
    for name, a, b in zip(names, poisoned_run(), want, strict=True):
        part.check(f"chunkwise {name}: {label}", rel_err(a, b), TOL[dtype], dtype=NAME[dtype], dk=dk, dv=dv, T=T)


def decode_step(part: Part, s: Sizes, dtype: torch.dtype, dk: int, dv: int, normalize: bool, steps: int = 3) -> None:
    """The decode kernel: one token through ``retention(mode="recurrent")`` (a new state), then ``steps`` tokens
    through ``decode_step_`` (in place), against float64."""
    dev, B, H = part.device, 3, s.heads
    dk, dv = dk // s.shrink, dv // s.shrink
    state = RetentionState.zeros(B, H, dk, dv, offset=torch.tensor([0, 17, 1000]), device=dev)  # S (B, H, dk, dv)
    state.S.normal_(), state.z.normal_()
    x = [torch.randn(B, H, steps, d, device=dev).to(dtype) for d in (dk, dk, dv)]  # q, k (B, H, steps, dk), v
    kw = dict(normalize_decay=normalize, normalize_retention=normalize)
    label = f"{NAME[dtype]} dk {dk} dv {dv}, B {B}, norms {'on' if normalize else 'off'}"

    def step(t: int, state: RetentionState, backend: str) -> tuple[Tensor, RetentionState]:
        token = [y[:, :, t : t + 1] if backend == "triton" else y[:, :, t : t + 1].double() for y in x]
        return retention(*token, state=state, mode="recurrent", output_state=True, backend=backend, **kw)

    want_state = RetentionState(state.S.double(), state.z.double(), state.offset.clone())
    with torch.no_grad():
        step(0, state, "triton")  # compiles
        poison(dev)
        o, new = step(0, state, "triton")
        want, want_new = step(0, want_state, "torch")
        for name, a, b in (("o", o, want), ("S", new.S, want_new.S), ("z", new.z, want_new.z)):
            part.check(f"retention recurrent, one token, {name}: {label}", rel_err(a, b), TOL[dtype])

        log_g = log_gamma("retnet", H).to(dev)  # (H,)
        outs, wants = [], []
        for t in range(steps):
            poison(dev)
            outs.append(decode_step_(*(y[:, :, t : t + 1] for y in x), log_g, state, **kw))  # (B, H, 1, dv)
            want, want_state = step(t, want_state, "torch")
            wants.append(want)
    part.check(f"decode_step_ o over {steps} steps: {label}", rel_err(torch.cat(outs, 2), torch.cat(wants, 2)),
               TOL[dtype])  # fmt: skip
    part.check(f"decode_step_ S in place: {label}", rel_err(state.S, want_state.S), TOL[dtype])
    part.check(f"decode_step_ z in place: {label}", rel_err(state.z, want_state.z), TOL[dtype])
    part.check_true(f"decode_step_ offset: {label}", torch.equal(state.offset, want_state.offset))


def beyond_2_31(part: Part) -> None:
    """bf16 (1, 64, 540000, 64): 2.2e9 elements a tensor, the last head's all at offsets past 2^31 (the states too:
    64 x 8438 chunks x 64 x 64). Forward and backward, the last head against float64 on that head alone."""
    if part.dry_run:
        part.notes.append("offsets past 2^31: skipped in the dry run (about 60 GB of GPU memory)")
        return
    B, H, T, D = 1, 64, 540_000, 64
    gamma = gamma_schedule("linspace", H)  # (H,): every head decays within a few hundred tokens
    q, k, v = leaves = [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in "qkv"]
    w = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)  # upstream gradient of o
    poison("cuda", limit=1 << 40)
    o, _ = retention(q, k, v, gamma, mode="chunkwise", chunk_size=64, backend="triton")
    poison("cuda", limit=1 << 40)
    got = [o[:, -1:], *(g[:, -1:] for g in torch.autograd.grad(o, leaves, w))]
    last = [t.detach()[:, -1:].double().requires_grad_() for t in leaves]  # (1, 1, T, D)
    o64, _ = retention(*last, gamma[-1:], mode="chunkwise", chunk_size=64, backend="torch")
    want = [o64, *torch.autograd.grad(o64, last, w[:, -1:].double())]
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        part.check(f"offsets past 2^31, {name} of the last head: bf16 (1, 64, 540000, 64)", rel_err(a, b), TOL[q.dtype])


def make_model(part: Part, s: Sizes) -> RetNetForCausalLM:
    """A small RetNet language model with random weights, float32, on the part's device."""
    torch.manual_seed(1)
    config = RetNetConfig(vocab_size=s.vocab, dim_model=s.dim_model, num_layers=2, num_heads=4, chunk_size=s.chunk)
    return RetNetForCausalLM(config).to(part.device)


def random_ids(part: Part, s: Sizes, length: int) -> Tensor:
    return torch.randint(0, s.vocab, (s.batch, length), device=part.device)  # (B, length)


def model_forms(part: Part, s: Sizes) -> None:
    """The parallel, chunkwise and recurrent forms in bf16 against the float64 model with the same rounded weights."""
    model = make_model(part, s).bfloat16().eval()
    reference = copy.deepcopy(model).double()
    ids = random_ids(part, s, s.model_tokens)
    with torch.no_grad():
        want = reference(ids, mode="parallel", use_cache=False).logits  # (B, T, V)
        for mode in ("parallel", "chunkwise", "recurrent"):
            got = model(ids, mode=mode, use_cache=False).logits
            part.check(f"model bf16, {mode} form: logits vs float64, T {s.model_tokens}", rel_err(got, want), FORMS_TOL)


def model_generate(part: Part, s: Sizes, implementation: str = "eager", rows: int | None = None) -> None:
    """Greedy generate() of ``rows`` sequences (default: the sizes' batch), a chunkwise prefill, then decoding steps
    by ``implementation`` (eager; compiled, on CUDA replayed from CUDA graphs; or aot), against the parallel forward
    over the sequence it generated: the logits behind each new token, and each token their argmax (or within a tie
    of it)."""
    model = make_model(part, s).eval()
    model.config.decode_implementation = implementation
    prompt_len = s.model_tokens // 3
    prompt = random_ids(part, s, prompt_len)[:rows]
    with torch.no_grad():
        if implementation != "eager":
            sizes = (len(prompt),)
            part.notes.append(f"{implementation} decoding step at batch {sizes[0]} warmed up in "
                              f"{model.warm_up_decoding(sizes):.1f} s")  # fmt: skip
        out = model.generate(prompt, max_new_tokens=s.new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)  # fmt: skip
        seq = out.sequences  # (B, prompt + new)
        want = model(seq, mode="parallel", use_cache=False).logits[:, prompt_len - 1 : -1]  # (B, new, V)
    got = torch.stack(out.logits, dim=1)  # (B, new, V)
    picked = seq[:, prompt_len:]  # (B, new)
    what = f"generate, {implementation} decoding, {len(prompt)} row(s)"
    part.check(f"{what}: {s.new_tokens} steps' logits vs the parallel forward (fp32)", rel_err(got, want),
               GENERATE_TOL)  # fmt: skip
    exact = want.argmax(-1) == picked
    margin = want.amax(-1) - want.gather(-1, picked[..., None])[..., 0]  # 0 where the token is the argmax
    tie = margin <= GENERATE_TOL * want.abs().amax()
    part.check_true(
        f"{what}: do_sample=False equals the parallel argmax (fp32)",
        bool((exact | tie).all()),
        f"{int(exact.sum())}/{exact.numel()} tokens exactly, the others within a tie",
    )


def train_step(model: torch.nn.Module, ids: Tensor, autocast: bool) -> tuple[Tensor, Tensor]:
    """The loss of one training step on ``ids`` and every parameter's gradient, flattened into one vector."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.double().flatten() for p in model.parameters()])


def model_step(part: Part, s: Sizes, compiled: bool) -> None:
    """A training step under bf16 autocast: finite, close to float64, and the same with its blocks' activations
    recomputed (activation checkpointing); or ``compiled``, torch.compile's step against eager's, both under bf16
    autocast. The dry run steps in float32 (bf16 autocast on the CPU is tested in
    tests/training/test_autocast.py) and compiles with the ``aot_eager`` backend (graph capture and autograd, no
    code generation: inductor takes a minute on the CPU)."""
    autocast = not part.dry_run
    kind = "bf16 autocast" if autocast else "float32, dry run"
    note = "model training steps in float32 (CPU autocast has its own tests), compiled by aot_eager"
    if not autocast and note not in part.notes:
        part.notes.append(note)
    model = make_model(part, s).train()  # float32 weights
    ids = random_ids(part, s, s.model_tokens)
    loss, grad = train_step(model, ids, autocast)
    if compiled:
        want_loss, want_grad = loss, grad
        loss, grad = train_step(torch.compile(model, backend="inductor" if autocast else "aot_eager"), ids, autocast)
        label = f"torch.compile training step ({kind}) vs eager"
    else:
        finite = bool(loss.isfinite() & grad.isfinite().all())
        part.check_true(f"training step ({kind}): loss and gradients finite", finite)
        model.activation_checkpointing_enable()
        recomputed, recomputed_grad = train_step(model, ids, autocast)
        model.activation_checkpointing_disable()
        part.check(f"training step ({kind}), activation checkpointing vs without: loss", rel_err(recomputed, loss),
                   RECOMPUTE_TOL)  # fmt: skip
        part.check(f"training step ({kind}), activation checkpointing vs without: gradients",
                   rel_err(recomputed_grad, grad), RECOMPUTE_TOL)  # fmt: skip
        want_loss, want_grad = train_step(copy.deepcopy(model).double(), ids, autocast=False)
        label = f"training step ({kind}) vs float64"
    part.check(f"{label}: loss", rel_err(loss, want_loss), AUTOCAST_TOL)
    part.check(f"{label}: gradients", rel_err(grad, want_grad), AUTOCAST_TOL)
