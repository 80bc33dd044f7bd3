"""One measurement each: decode, prefill, training step, matmul peak. Each returns a JSON-ready dict.

Run as a script, one measurement per fresh process, so that the process's peak RSS belongs to that
configuration alone::

    python benchmarks/measure.py --worker '{"task": "decode", "model": "retentive", "context": 8192}'
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers
from benchkit import MMAP_VARIABLE, answer_worker, peak_rss_bytes, reset_peak_rss, rss_bytes


def _dims(spec: dict) -> peers.Dims:
    return peers.Dims(**spec.get("dims", {}))


@torch.no_grad()
def decode(spec: dict) -> dict:
    """Per-token decode time at each of ``batches`` (default 1 and ``batch``) after ``context`` tokens.

    The state is the one a prefill of ``context`` tokens leaves, filled with random values; the step time does
    not depend on the values. ``decode_implementation`` (retentive only) chooses its decoding step; a compiled
    one is warmed up first (``warm_up_s``, batch 1 and 2), and the first step at each batch size is timed too
    (``first_step_ms``: a stall there is what a server's users would notice). Peak RSS is read after each batch.
    """
    adapter, warm_up_s = _decoder(spec, _dims(spec))
    out = {} if warm_up_s is None else {"warm_up_s": warm_up_s}
    context, steps, warmup = spec["context"], spec.get("steps", 32), spec.get("warmup", 3)
    for batch in spec.get("batches", (1, spec.get("batch", 8))):
        state = adapter.synthetic_state(batch, context)
        cache_bytes = adapter.cache_bytes(state)
        token = torch.randint(0, adapter.dims.vocab_size, (batch, 1))
        times = []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            _, state = adapter.decode_step(token, state)
            times.append(time.perf_counter() - t0)
        step = statistics.median(times[warmup:])
        out[f"b{batch}"] = {
            "ms_per_token": 1e3 * step,
            "first_step_ms": 1e3 * times[0],  # a compiled step that compiled again here would take seconds
            "tokens_per_s": batch / step,
            "cache_bytes": cache_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        del state
    return out


def _decoder(spec: dict, dims: peers.Dims):
    """The adapter of ``spec["model"]``, and with ``decode_implementation`` (retentive only) that step, warmed
    up: (adapter, seconds the warm-up took, or None)."""
    adapter = peers.build(spec["model"], dims)
    if "decode_implementation" not in spec:
        return adapter, None
    adapter.model.config.decode_implementation = spec["decode_implementation"]
    return adapter, adapter.model.warm_up_decoding()


@torch.no_grad()
def paired(spec: dict) -> dict:
    """Each of ``models`` (decode specs, as for :func:`decode`) against the first, in one process, step for step.

    On a machine whose speed drifts over seconds (a shared host), cells timed in separate processes minutes apart
    give ratios that drift with it. Here every cycle times ``steps`` steps of each model back to back, at each of
    ``batches`` after ``context`` tokens, and a ratio is taken within the cycle: the median of the ``cycles``
    ratios is what the cycle-to-cycle drift leaves alone. Per model: the median of its cycles' step times, and its
    ratio to the first model (median, min, max over cycles). A model's spec may name a ``context`` of its own: the same
    step after two contexts, step for step, says whether its cost is flat.
    """
    adapters = [_decoder(model, _dims(spec))[0] for model in spec["models"]]
    warmup = spec.get("warmup", 2)
    out = {}
    for batch in spec.get("batches", (1, 8)):
        token = torch.randint(0, adapters[0].dims.vocab_size, (batch, 1))
        states = [
            adapter.synthetic_state(batch, model.get("context", spec["context"]))
            for adapter, model in zip(adapters, spec["models"], strict=True)
        ]
        cycles: list[list[float]] = [[] for _ in adapters]
        for _ in range(spec.get("cycles", 10)):
            for i, adapter in enumerate(adapters):
                times = []
                for _ in range(warmup + spec.get("steps", 16)):
                    t0 = time.perf_counter()
                    _, states[i] = adapter.decode_step(token, states[i])
                    times.append(time.perf_counter() - t0)
                cycles[i].append(statistics.median(times[warmup:]))
        out[f"b{batch}"] = [
            {
                "ms_per_token": 1e3 * statistics.median(mine),
                "ratio": statistics.median(r := [t / first for t, first in zip(mine, cycles[0], strict=True)]),
                "ratio_min": min(r),
                "ratio_max": max(r),
            }
            for mine in cycles
        ]
    return out


@torch.no_grad()
def generate(spec: dict) -> dict:
    """ms per generated token of retentive's ``generate()`` (greedy, ``new_tokens`` after a ``prompt``-token
    prompt, batch ``batch``), the prompt's prefill subtracted; ``decode_implementation`` as in :func:`decode`."""
    adapter = peers.build("retentive", _dims(spec))
    lm = adapter.model
    lm.config.decode_implementation = spec.get("decode_implementation", "eager")
    if lm.config.decode_implementation != "eager":
        lm.warm_up_decoding()
    ids = torch.randint(0, adapter.dims.vocab_size, (spec.get("batch", 1), spec.get("prompt", 512)))
    new = spec.get("new_tokens", 128)

    def run(tokens: int) -> float:
        return _timed(lambda: lm.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False))

    run(new)  # warm-up
    rounds = spec.get("repeats", 3)
    full, prompt_only = min(run(new) for _ in range(rounds)), min(run(1) for _ in range(rounds))
    return {"ms_per_token": 1e3 * (full - prompt_only) / (new - 1), "tokens": new}


@torch.no_grad()
def weight_bound(spec: dict) -> dict:
    """What one decoding step of retentive at ``dims`` cannot beat on this machine, per batch size in ``batches``:

    - ``weights_ms``: one product of a (B, d) batch with a matrix holding the step's weight bytes (every Linear,
      the output head included; the embedding reads one row per token): at batch 1 a matrix-vector product, the
      weight-read bound; at 8 and 64 the same bytes plus the arithmetic. The fastest of the product kernels at
      hand (``weights_by_kernel``: torch's ``F.linear``, oneDNN's linear, NumPy's BLAS): one library's slow path
      on a given CPU (MKL's on AMD's, up to 4x) must not make the bound easier to meet;
    - ``read_ms``: one pass over the same bytes (a sum), what no product can beat;
    - ``state_ms``: reading and writing every layer's state once (a copy of its bytes), which grows with B;
    - ``products_ms``: the step's own matrix products alone, one ``F.linear`` call per ``nn.Linear`` of the model
      on its own weights, as the step issues them (a floor for any step built of one library call per product);
      ``fused_products_ms``: the same with each layer's q, k, v and g projections in one product.
    """
    lm = peers.build("retentive", _dims(spec)).model
    d = lm.config.dim_model
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    W = torch.randn(sum(m.weight.numel() for m in linears) // d, d)
    fused = [torch.cat([m.weight for m in group]) for group in _projection_groups(lm)]
    dk, dv = lm.config.head_dims
    out = {"weight_bytes": W.numel() * 4, "products": len(linears), "fused_products": len(fused)}
    for batch in spec.get("batches", (1, 8, 64)):
        x = torch.randn(batch, d)
        state = torch.randn(lm.config.num_layers * batch * lm.config.num_heads * dk * (dv + 1))
        copy = torch.empty_like(state)
        inputs = {n: torch.randn(batch, n) for n in {m.in_features for m in linears}}
        products = [(inputs[m.in_features], m.weight, m.bias) for m in linears]
        fused_products = [(inputs[w.shape[1]], w, None) for w in fused]
        repeats = spec.get("repeats", 50)
        with torch.no_grad():
            kernels = {name: _median_ms(fn, repeats) for name, fn in _product_kernels(x, W).items()}
            out[f"b{batch}"] = {
                "weights_ms": min(kernels.values()),
                "weights_by_kernel": kernels,
                "read_ms": _median_ms(W.sum, repeats),
                "state_ms": _median_ms(functools.partial(copy.copy_, state), repeats),
                "state_bytes": state.numel() * 4,
                "products_ms": _median_ms(functools.partial(_products, products), repeats),
                "fused_products_ms": _median_ms(functools.partial(_products, fused_products), repeats),
            }
    return out


def _product_kernels(x: torch.Tensor, W: torch.Tensor) -> dict[str, functools.partial]:
    """``x @ W.T`` by each library at hand: torch's ``F.linear`` (MKL on x86), oneDNN's linear, NumPy's BLAS."""
    kernels = {"torch": functools.partial(torch.nn.functional.linear, x, W)}
    if torch.backends.mkldnn.is_available():
        kernels["onednn"] = functools.partial(torch.ops.mkldnn._linear_pointwise, x, W, None, "none", [], "")
    kernels["numpy"] = functools.partial(numpy.matmul, x.numpy(), W.numpy().T)
    return kernels


def _projection_groups(lm: torch.nn.Module) -> list[list[torch.nn.Linear]]:
    """Every Linear of ``lm``, each layer's q, k, v and g projections (which read the same input) as one group."""
    groups, seen = [], set()
    for module in lm.modules():
        group = [p for n in ("q_proj", "k_proj", "v_proj", "g_proj") if (p := getattr(module, n, None)) is not None]
        if len(group) >= 3 and all(isinstance(p, torch.nn.Linear) and p.bias is None for p in group):
            groups.append(group)
            seen.update(map(id, group))
    return groups + [[m] for m in lm.modules() if isinstance(m, torch.nn.Linear) and id(m) not in seen]


def _products(products: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
    for x, weight, bias in products:
        torch.nn.functional.linear(x, weight, bias)


@torch.no_grad()
def prefill(spec: dict) -> dict:
    """Seconds to read ``tokens`` prompt tokens and build the decode state (batch 1): best of ``repeats`` after a
    first call, which pays one-time costs (first touch of the buffers, kernel setup) that a server pays once."""
    adapter = peers.build(spec["model"], _dims(spec))
    tokens = torch.randint(0, adapter.dims.vocab_size, (1, spec["tokens"]))
    adapter.prefill(tokens)
    seconds = min(_timed(lambda: adapter.prefill(tokens)) for _ in range(spec.get("repeats", 2)))
    return {"seconds": seconds, "tokens_per_s": spec["tokens"] / seconds, "peak_rss_bytes": peak_rss_bytes()}


def _median_ms(fn, repeats: int) -> float:
    """The median of ``repeats`` timings of ``fn()`` after a first call, in ms."""
    fn()
    return 1e3 * statistics.median(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _trainee(spec: dict) -> tuple[Any, torch.Tensor]:
    """The adapter of ``spec["model"]`` in training mode and its input (``batch``, ``tokens``). ``mode``,
    ``chunk_size`` and ``loss`` apply to ``retentive`` (peers train in their own chunkwise form);
    ``activation_checkpointing`` recomputes each block in the backward (transformers' models: retentive, the
    Transformer)."""
    kwargs = {k: spec[k] for k in ("mode", "chunk_size", "loss") if k in spec}
    adapter = peers.build(spec["model"], _dims(spec), **kwargs)
    adapter.model.train()
    if spec.get("activation_checkpointing"):
        from retentive.training import enable_activation_checkpointing

        enable_activation_checkpointing(adapter.model)
    return adapter, torch.randint(0, adapter.dims.vocab_size, (spec.get("batch", 1), spec["tokens"]))


def train(spec: dict) -> dict:
    """Forward+backward tokens/s on one sequence of ``tokens`` tokens (best of ``repeats`` after a warm-up step),
    and the process's peak RSS; the options of :func:`_trainee`."""
    adapter, tokens = _trainee(spec)

    def step() -> None:
        adapter.model.zero_grad(set_to_none=True)
        adapter.train_loss(tokens).backward()

    step()  # warm-up
    # the best of ``repeats``, as timeit reports: on a shared machine noise only ever adds time
    seconds = min(_timed(step) for _ in range(spec.get("repeats", 3)))
    return {"tokens_per_s": tokens.numel() / seconds, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}


def train_memory(spec: dict) -> dict:
    """The extra resident memory of one forward+backward on ``tokens`` tokens (model and inputs excluded); the
    options of :func:`_trainee`.

    Run it in a process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (as ``run.py`` does): every buffer above
    64 KiB is then its own mapping, returned to the system when freed, so the resident set follows the live
    tensors. After a warm-up step of the same length (one-time setup: lazily built caches, and the gated norm
    that retentive compiles at this size), the kernel's high-water mark is reset
    (``/proc/self/clear_refs``); the peak is ``VmHWM - VmRSS`` around the measured step. Linux only.
    """
    adapter, tokens = _trainee(spec)
    adapter.train_loss(tokens).backward()
    adapter.model.zero_grad(set_to_none=False)  # gradients stay allocated: the measured step only fills them
    reset_peak_rss()
    before = rss_bytes()
    adapter.train_loss(tokens).backward()
    return {"step_peak_bytes": peak_rss_bytes() - before, "malloc_mmap_threshold": os.environ.get(MMAP_VARIABLE)}


def matmul(spec: dict) -> dict:
    """This machine's float32 matmul rate: a (n, n) @ (n, n) product, best of ``repeats``, in GFLOP/s."""
    n = spec.get("n", 2048)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    seconds = min(_timed(lambda: a @ b) for _ in range(spec.get("repeats", 10)))
    return {"n": n, "gflops": 2 * n**3 / seconds / 1e9}


TASKS = {
    "decode": decode,
    "paired": paired,
    "generate": generate,
    "weight_bound": weight_bound,
    "prefill": prefill,
    "train": train,
    "train_memory": train_memory,
    "matmul": matmul,
}


def run(spec: dict) -> dict:
    """Run the measurement ``spec["task"]`` in this process."""
    if spec["task"] not in TASKS:
        raise ValueError(f"unknown task {spec['task']!r}; choose from {sorted(TASKS)}")
    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
    return TASKS[spec["task"]](spec)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", required=True, metavar="JOB", help="the measurement, as JSON")
    answer_worker(run, parser.parse_args().worker)
