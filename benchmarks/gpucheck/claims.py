"""The paper's claims on one GPU, random weights, bf16: RetNet against a Llama of the same size.

(a) Inference at the paper's 6.7B shape (d 4096, 32 layers, 16 heads) with 8,192 tokens of input: GPU memory,
latency per decoded token at batch 1 to 8, and decode throughput at the largest batch each model fits.
(b) Training at the 1.3B shape on one sequence of 8,192 tokens: tokens/s and peak memory.

What each side runs, built on the GPU in its own class with random weights:

- RetNet: ``RetNetForCausalLM`` (``retnet-6.7b`` / ``retnet-1.3b``). Prefill: ``model(ids, use_cache=True,
  logits_to_keep=1)``, the chunkwise form in pieces of ``config.prefill_chunk`` tokens; decoding: the same call on one
  token with the ``RetNetCache``, the recurrent step (the fused Triton kernel), which writes the new float32 state
  over the old one, as a static KV cache is updated in place (the cache's own states: ``overwrite=True``, as
  ``generate()`` does with the states of its own prefill). Training: ``model(ids, labels=ids)`` in the chunkwise
  form (Triton kernels forward and backward) with the loss computed block by block from the hidden states (the
  library's training loss).
- Llama: Hugging Face ``LlamaForCausalLM`` with SDPA, parameter-matched (``transformer-6.7b`` /
  ``transformer-1.3b``, :mod:`retentive.baselines`). Prefill and decoding: ``model(input_ids=..., cache=StaticCache,
  use_cache=True, logits_to_keep=1)``; the static cache holds 8,192 + 64 positions in bf16 and every step attends
  over all of them under a mask, as static-cache decoding does. Training: ``model(input_ids=ids, labels=ids)``
  (SDPA's FlashAttention; Hugging Face's loss, on the logits made float32).

Batch 1 decodes after a real prefill of 8,192 tokens; larger batches start from caches of the same shape filled
with random values (a step's cost does not depend on them). Decoding is timed eagerly (the call above) and, for the
latency batches, replayed from a CUDA graph (the same call; the Llama's given its 4-D mask and positions so that
nothing in it reads the GPU from the host); throughput is eager only: at those batches a step is bound by the GPU,
and a graph's output pool would need a second copy of RetNet's states. Times are medians over 3 rounds of several
steps between CUDA events. Training is pure bf16 (parameters, gradients and AdamW states) with the library's fused
AdamW (``training.optim.build_optimizer``), the same for both, forward + backward + optimizer step. Memory is
``torch.cuda.max_memory_allocated`` after a reset: weights, cache or state, and the step's activations.

A step's floor is the bytes it must move over the copy bandwidth measured in the same run: the weights once, plus
the KV cache read (Llama) or the state read and written (RetNet).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from gpucheck.harness import Ceilings, Part, capture, cuda_ms, free_cuda, gib, measure_ceilings
from retentive.baselines import count_parameters, transformer_config_from_preset
from retentive.models import CACHE_NAME, RetNetCache, RetNetConfig, RetNetForCausalLM, cache_of
from retentive.ops import RetentionState, linear_cross_entropy, retention
from retentive.ops.cross_entropy import BLOCK_ELEMENTS
from retentive.training.optim import build_optimizer

CONTEXT = 8192  # tokens of input before decoding: the paper's 8k
HEADROOM = 64  # static-cache positions past the context for the timed steps (the cache is rewound before each timing)
LATENCY_BATCHES = (1, 2, 4, 8)
BATCH_CAP = 512  # the most rows a throughput run decodes, so that the time box holds
MARGIN = 8 << 30  # bytes left free when sizing the largest batch: the step's activations, fragmentation
STEPS = 8  # decode steps per timing round
TRAIN_TOKENS = 8192
# the dry run: the same code at tiny sizes on the CPU
DRY_SHAPE = dict(vocab_size=512, dim_model=64, num_layers=2, num_heads=2, ffn_dim=128)  # RetNetConfig overrides
DRY_CONTEXT, DRY_HEADROOM, DRY_TRAIN_TOKENS = 64, 32, 128
DRY_FREE, DRY_CAP = 2 << 20, 8  # bytes "free" and the batch cap that stand for the GPU's when sizing the batch

PAPER_MEMORY, PAPER_THROUGHPUT, PAPER_LATENCY = 3.4, 8.4, 15.6  # Sun et al. 2023, 6.7B at 8k
TRAIN_SPEEDUP = 1.15
MEMORY_TARGET = f"6.7B, 8k: GPU memory at least {PAPER_MEMORY}x lower than the Llama's (judged at batch 8)"
THROUGHPUT_TARGET = f"6.7B, 8k: decode throughput at least {PAPER_THROUGHPUT}x the Llama's, each at its largest batch"
LATENCY_TARGET = f"6.7B, 8k: latency per token at least {PAPER_LATENCY}x lower than the Llama's (judged at batch 8)"
TRAIN_TARGET = f"1.3B, 8k: training tokens/s at least {TRAIN_SPEEDUP}x the Llama's (SDPA) at no more memory"


def run(part: Part) -> None:
    """(a) inference at 6.7B, RetNet then Llama, and its three targets; (b) training at 1.3B and its target."""
    ceilings = measure_ceilings(part.device)
    context = DRY_CONTEXT if part.dry_run else CONTEXT
    if part.dry_run:
        torch.set_num_threads(1)  # tiny tensors: one thread, spared the spin-waits of a pool on a busy machine
        part.notes.append("dry run: 2-layer d=64 models on the CPU, 64 tokens of input: every figure is meaningless")
    part.notes.append(
        "inference: batch 1 decodes after a real prefill, larger batches from caches of the same shape filled with "
        "random values; training: bf16 parameters, gradients and AdamW states on both sides"
    )
    tables = Tables(
        latency=part.table(
            f"Inference, 6.7B shape: latency per token after {context:,} tokens of input",
            ["model", "batch", "cache MB", "peak GiB", "ms/token eager", "ms/token CUDA graph", "floor ms"],
        ),
        memory=part.table(
            f"Inference, 6.7B shape: GPU memory with {context:,} tokens of input",
            ["model", "parameters (B)", "weights GiB", "cache per row MiB", "prefill peak GiB (batch 1)"]
            + [f"decode peak GiB (batch {b})" for b in (1, LATENCY_BATCHES[-1])],
        ),
        throughput=part.table(
            f"Inference, 6.7B shape: decode throughput at the largest batch each fits, {context:,} tokens of input",
            ["model", "batch", "cache GiB", "peak GiB", "ms/step eager", "tokens/s", "floor ms"],
        ),
    )
    inference = {}
    retnet_config, llama_config = configs(part, "6.7b")
    for label, config in (("RetNet", retnet_config), ("Llama", llama_config)):
        inference[label] = decode_side(part, label, config, ceilings, tables)
    inference_targets(part, inference["RetNet"], inference["Llama"])
    tokens = DRY_TRAIN_TOKENS if part.dry_run else TRAIN_TOKENS
    add = part.table(
        f"Training, 1.3B shape: 1 x {tokens:,} tokens, forward + backward + AdamW step",
        ["model", "parameters (B)", "ms/step", "tokens/s", "peak GiB", "6N TFLOP/s", "mixer ms", "loss ms", "rest ms"],
    )
    training = {}
    retnet_config, llama_config = configs(part, "1.3b", mode="chunkwise")
    for label, config in (("RetNet", retnet_config), ("Llama", llama_config)):
        training[label] = train_side(part, label, config, tokens, add)
    training_target(part, training["RetNet"], training["Llama"], retnet_config.vocab_size, ceilings)
    if not part.out_of_time(reserve=20):  # after the target: what recomputing the blocks costs and saves here
        train_side(part, "RetNet, activation checkpointing", retnet_config, tokens, add, recompute=True)


@dataclass
class Tables:
    """The ``add(row)`` of each inference table."""

    latency: Callable[[list], None]
    memory: Callable[[list], None]
    throughput: Callable[[list], None]


def configs(part: Part, size: str, **overrides) -> tuple[RetNetConfig, LlamaConfig]:
    """The RetNet preset ``retnet-<size>`` and its parameter-matched Llama (tiny versions of both in the dry run)."""
    overrides = {**(DRY_SHAPE if part.dry_run else {}), **overrides}
    retnet = RetNetConfig.from_preset(f"retnet-{size}", **overrides)
    return retnet, transformer_config_from_preset(f"transformer-{size}", **overrides)


def build(config: RetNetConfig | LlamaConfig, device: str, dtype: torch.dtype) -> nn.Module:
    """A model with random weights, built where it runs and in ``dtype`` (a 6.7B model never passes the CPU)."""
    cls = RetNetForCausalLM if isinstance(config, RetNetConfig) else LlamaForCausalLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained(dtype=...) does: float buffers made in float32 stay so
    try:
        with torch.device(device):
            return cls(config)
    finally:
        torch.set_default_dtype(previous)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters (a tied head counted once): what a decode step reads at least once."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def reset_peak(device: str) -> None:
    """Start a new count of the most bytes allocated (the GPU's; the CPU keeps none)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> float:
    """The most bytes allocated since :func:`reset_peak` (NaN on the CPU, which keeps no such count)."""
    return float(torch.cuda.max_memory_allocated()) if device == "cuda" else math.nan


def per_step_ms(step: Callable[[], object], steps: int) -> float:
    """Milliseconds per call of ``step``: two warm-up calls, then the median of 3 rounds of ``steps`` calls."""

    def round_of_steps() -> None:
        for _ in range(steps):
            step()

    for _ in range(2):
        step()
    return cuda_ms(round_of_steps, repeat=3) / steps


# ---------------------------------------------------------------------------------------------------- decoding


class Decoder:
    """One model's decoding after ``context`` tokens: its cache (from a prefill or random) and one step.

    ``traffic`` is how many times a step moves its cache's bytes: 1 where it is read, 2 where it is read and
    written.
    """

    traffic = 1

    def __init__(self, model: nn.Module, context: int, headroom: int) -> None:
        self.model, self.context, self.headroom = model, context, headroom
        self.device = next(model.parameters()).device

    def prefill(self, ids: torch.Tensor):
        """The cache after reading ``ids`` (B, T)."""
        raise NotImplementedError

    def random_cache(self, batch: int):
        """A cache of ``batch`` rows shaped as after ``context`` tokens, filled with random values."""
        raise NotImplementedError

    def cache_bytes(self, cache) -> int:
        """Bytes the cache holds."""
        raise NotImplementedError

    def row_bytes(self) -> int:
        """Bytes one more row holds during a step: sizes the largest batch."""
        raise NotImplementedError

    def step(self, cache, token: torch.Tensor) -> Callable[[], object]:
        """One decoding step of ``token`` (B, 1), called as a user calls it; it advances ``cache``."""
        raise NotImplementedError

    def graph_step(self, cache, token: torch.Tensor) -> Callable[[], object]:
        """The same step with nothing in it that reads the GPU from the host, for CUDA-graph capture."""
        raise NotImplementedError

    def rewind(self, cache) -> None:
        """Back to ``context`` tokens read, where the cache has a fixed length (a no-op otherwise)."""


class RetNetDecoder(Decoder):
    """``RetNetForCausalLM`` with its ``RetNetCache``: one float32 state (S, z) per layer, whatever the length."""

    traffic = 2  # each state read, then written over

    def prefill(self, ids: torch.Tensor) -> RetNetCache:
        cache = cache_of(self.model(ids, use_cache=True, logits_to_keep=1))
        return RetNetCache(cache.states, cache.seen_tokens, overwrite=True)  # nobody else reads these states

    def random_cache(self, batch: int) -> RetNetCache:
        cfg = self.model.config
        (dk, dv), H = cfg.head_dims, cfg.num_heads
        states = []
        for _ in range(cfg.num_layers):
            state = RetentionState.zeros(batch, H, dk, dv, offset=self.context, device=self.device)
            state.S.normal_(), state.z.normal_()  # S (B, H, dk, dv), z (B, H, dk)
            states.append(state)
        return RetNetCache(states, seen_tokens=self.context, overwrite=True)

    def cache_bytes(self, cache: RetNetCache) -> int:
        return cache.nbytes()

    def row_bytes(self) -> int:
        cfg = self.model.config
        (dk, dv), H = cfg.head_dims, cfg.num_heads
        return cfg.num_layers * H * (dk * dv + dk) * 4  # one state, written over by each step

    def step(self, cache: RetNetCache, token: torch.Tensor) -> Callable[[], object]:
        return lambda: self.model(token, cache=cache, use_cache=True, logits_to_keep=1)

    def graph_step(self, cache: RetNetCache, token: torch.Tensor) -> Callable[[], object]:
        # every replay steps from the same states: they stay referenced here while the graph reads them
        states, seen = cache.states, cache.seen_tokens
        return lambda: self.model(token, cache=RetNetCache(states, seen), use_cache=True, logits_to_keep=1)


class LlamaDecoder(Decoder):
    """``LlamaForCausalLM`` (SDPA) with a ``StaticCache`` of ``context + headroom`` positions in bf16."""

    def new_cache(self) -> StaticCache:
        return StaticCache(config=self.model.config, max_cache_len=self.context + self.headroom)

    def prefill(self, ids: torch.Tensor) -> StaticCache:
        cache = self.new_cache()
        self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})
        return cache

    def random_cache(self, batch: int) -> StaticCache:
        cfg = self.model.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        cache = self.new_cache()
        cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, self.model.dtype, self.device)
        for layer in cache.layers:  # keys, values: (B, H, context + headroom, head_dim)
            layer.keys.normal_(), layer.values.normal_()
        self.rewind(cache)
        return cache

    def cache_bytes(self, cache: StaticCache) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    def row_bytes(self) -> int:
        cfg = self.model.config
        return 2 * cfg.num_hidden_layers * cfg.hidden_size * (self.context + self.headroom) * self.model.dtype.itemsize

    def step(self, cache: StaticCache, token: torch.Tensor) -> Callable[[], object]:
        return lambda: self.model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})

    def graph_step(self, cache: StaticCache, token: torch.Tensor) -> Callable[[], object]:
        length = self.context + self.headroom
        positions = torch.full((1, 1), self.context, device=self.device)
        # the mask the model makes itself for a static cache: (B, 1, 1, length), True up to the position written
        mask = (torch.arange(length, device=self.device) <= self.context).expand(token.shape[0], 1, 1, length)
        return lambda: self.model(
            input_ids=token,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_NAME: cache},
        )

    def rewind(self, cache: StaticCache) -> None:
        for layer in cache.layers:
            layer.cumulative_length.fill_(self.context)


@dataclass
class Decoded:
    """One model's decoding at one batch size (bytes, milliseconds; ``peak`` NaN on the CPU)."""

    batch: int
    cache_bytes: int
    peak: float
    eager_ms: float
    floor_ms: float
    graph_ms: float | None = None

    def best_ms(self, graphs: bool) -> float:
        """The CUDA graph's time where both sides have one (``graphs``), else the eager time."""
        return self.graph_ms if graphs else self.eager_ms


@dataclass
class Side:
    """What one model's inference measured (bytes)."""

    weights: int = 0
    row_bytes: int = 0
    prefill_peak: float = math.nan
    latency: dict[int, Decoded] = field(default_factory=dict)
    throughput: Decoded | None = None


def decode_side(part: Part, label: str, config, ceilings: Ceilings, tables: Tables) -> Side:
    """Build the 6.7B model; prefill at batch 1; time decoding at batch 1 to 8, then at the largest batch it fits."""
    side = Side()
    if part.out_of_time(reserve=40 if label == "RetNet" else 30):
        return side
    context, headroom = (DRY_CONTEXT, DRY_HEADROOM) if part.dry_run else (CONTEXT, HEADROOM)
    model = cache = None
    try:
        model = build(config, part.device, torch.bfloat16).eval()
        side.weights = weight_bytes(model)
        decoder = (RetNetDecoder if label == "RetNet" else LlamaDecoder)(model, context, headroom)
        side.row_bytes = decoder.row_bytes()
        with torch.no_grad():
            ids = torch.randint(0, config.vocab_size, (1, context), device=part.device)  # (1, context)
            reset_peak(part.device)
            cache = decoder.prefill(ids)
            side.prefill_peak = peak_bytes(part.device)
            for batch in LATENCY_BATCHES:
                if part.out_of_time(reserve=25):
                    break
                try:
                    if batch > 1:
                        cache = None
                        free_cuda()
                        cache = decoder.random_cache(batch)
                    row = decode_batch(part, decoder, cache, batch, side.weights, ceilings, STEPS, graph=True)
                    side.latency[batch] = row
                    tables.latency(
                        [label, batch, row.cache_bytes / 1e6, gib(row.peak), row.eager_ms, row.graph_ms, row.floor_ms]
                    )
                except Exception as e:
                    part.error(f"{label} decoding at batch {batch}", e)
            cache = None
            free_cuda()
            peaks = [gib(side.latency[b].peak) if b in side.latency else None for b in (1, LATENCY_BATCHES[-1])]
            per_row = side.latency[1].cache_bytes if 1 in side.latency else math.nan
            params = count_parameters(model) / 1e9
            tables.memory([label, params, gib(side.weights), per_row / 2**20, gib(side.prefill_peak), *peaks])
            if not part.out_of_time(reserve=65 if label == "RetNet" else 45):
                side.throughput = largest_batch(part, label, decoder, side, ceilings, tables)
    except Exception as e:
        part.error(f"{label} 6.7B inference", e)
    finally:
        model = cache = None
        free_cuda()
    return side


def decode_batch(
    part: Part, decoder: Decoder, cache, batch: int, weights: int, ceilings: Ceilings, steps: int, graph: bool
) -> Decoded:
    """Time ``steps`` decoding steps at ``batch`` rows: eager (peak memory read there), then from a CUDA graph."""
    token = torch.randint(0, decoder.model.config.vocab_size, (batch, 1), device=part.device)  # (B, 1)
    nbytes = decoder.cache_bytes(cache)
    decoder.rewind(cache)
    reset_peak(part.device)
    eager = per_step_ms(decoder.step(cache, token), steps)
    row = Decoded(batch, nbytes, peak_bytes(part.device), eager, ceilings.bytes_ms(weights + decoder.traffic * nbytes))
    if graph:
        decoder.rewind(cache)
        step = decoder.graph_step(cache, token)
        if part.device != "cuda":
            step()  # the dry run checks the call; the CPU has no graph to capture
            return row
        try:
            replay = capture(step)
            decoder.rewind(cache)
            row.graph_ms = per_step_ms(replay.replay, steps)
        except Exception as e:  # a host synchronization inside the step stops the capture: eager figures stand
            part.error(f"CUDA graph of {type(decoder).__name__} at batch {batch}", e)
    return row


def largest_batch(part: Part, label: str, decoder: Decoder, side: Side, ceilings: Ceilings, tables: Tables):
    """Eager decoding at the most rows that fit beside the weights (capped at ``BATCH_CAP``); on running out of
    memory, 3/4 of the rows, at most twice more. Returns the :class:`Decoded`, or None."""
    free_cuda()
    free, cap = (DRY_FREE, DRY_CAP) if part.dry_run else (torch.cuda.mem_get_info()[0] - MARGIN, BATCH_CAP)
    batch = max(1, min(cap, free // side.row_bytes))
    cache = None
    for _ in range(3):
        try:
            cache = decoder.random_cache(batch)
            row = decode_batch(part, decoder, cache, batch, side.weights, ceilings, steps=4, graph=False)
            tokens_per_s = batch / row.eager_ms * 1e3
            cells = [label, batch, gib(row.cache_bytes), gib(row.peak), row.eager_ms, tokens_per_s, row.floor_ms]
            tables.throughput(cells)
            return row
        except torch.cuda.OutOfMemoryError:
            part.notes.append(f"{label}: out of GPU memory decoding {batch} rows; trying {batch * 3 // 4}")
        cache = None
        free_cuda()
        batch = max(1, batch * 3 // 4)
    return None


def inference_targets(part: Part, retnet: Side, llama: Side) -> None:
    """The paper's three inference ratios from what both sides measured."""
    last = LATENCY_BATCHES[-1]
    measured = all(b in side.latency for side in (retnet, llama) for b in (1, last))
    if not measured:
        for what in (MEMORY_TARGET, LATENCY_TARGET):
            part.target(what, None, "not measured", "a side's decoding at batch 1 or 8 is missing (see notes)")
    else:
        r1, r8, l1, l8 = retnet.latency[1], retnet.latency[last], llama.latency[1], llama.latency[last]
        # peak(batch) = base + batch * slope on each side: the rows at which the ratio would reach the paper's
        slope_r, slope_l = (r8.peak - r1.peak) / (last - 1), (l8.peak - l1.peak) / (last - 1)
        base_r, base_l = r1.peak - slope_r, l1.peak - slope_l
        rows = (PAPER_MEMORY * base_r - base_l) / (slope_l - PAPER_MEMORY * slope_r)
        reach = f"about {rows:.0f} rows" if slope_l > PAPER_MEMORY * slope_r else "no batch"
        ratio = l8.peak / r8.peak
        part.target(
            MEMORY_TARGET,
            judged(part, ratio >= PAPER_MEMORY),
            f"{ratio:.2f}x at batch {last} ({l1.peak / r1.peak:.2f}x at batch 1)",
            f"the weights are the same {gib(retnet.weights):.1f} GiB on each side; per row the KV cache holds "
            f"{l1.cache_bytes / 2**20:.0f} MiB and RetNet {retnet.row_bytes / 2**20:.0f} MiB (its float32 state, "
            f"written over in place); the ratio reaches {PAPER_MEMORY}x at {reach}. A bf16 state would halve "
            "RetNet's per-row memory",
        )
        graphs = all(d.graph_ms is not None for d in (r1, r8, l1, l8))
        ratio = l8.best_ms(graphs) / r8.best_ms(graphs)
        part.target(
            LATENCY_TARGET,
            judged(part, ratio >= PAPER_LATENCY),
            f"{ratio:.2f}x at batch {last}, {l1.best_ms(graphs) / r1.best_ms(graphs):.2f}x at batch 1 "
            + (f"(CUDA graphs; eager: {l8.eager_ms / r8.eager_ms:.2f}x at batch {last})" if graphs else "(eager)"),
            f"bandwidth floors at batch {last}: Llama {l8.floor_ms:.2f} ms (the weights and "
            f"{l8.cache_bytes / 1e9:.1f} GB of KV cache read), RetNet {r8.floor_ms:.2f} ms (the same weights and "
            f"{2 * r8.cache_bytes / 1e9:.1f} GB of state read and written): at best {l8.floor_ms / r8.floor_ms:.1f}x; "
            f"measured at {l8.best_ms(graphs) / l8.floor_ms:.1f}x and {r8.best_ms(graphs) / r8.floor_ms:.1f}x their "
            "floors. Both read the same weights every step, so only a longer context or a larger batch (more KV "
            "cache per step) moves the floor ratio",
        )
    rt, lt = retnet.throughput, llama.throughput
    if rt is None or lt is None:
        part.target(THROUGHPUT_TARGET, None, "not measured", "a side's largest batch is missing (see notes)")
        return
    ratio = (rt.batch / rt.eager_ms) / (lt.batch / lt.eager_ms)
    floor_ratio = (rt.batch / rt.floor_ms) / (lt.batch / lt.floor_ms)
    kv_row, state_row = lt.cache_bytes / lt.batch, 2 * rt.cache_bytes / rt.batch
    part.target(
        THROUGHPUT_TARGET,
        judged(part, ratio >= PAPER_THROUGHPUT),
        f"{ratio:.2f}x ({rt.batch} rows against {lt.batch})",
        f"per row a step moves {state_row / 1e6:.0f} MB of float32 state (read and written) against "
        f"{kv_row / 1e6:.0f} MB of KV cache read, so as the batch grows the bandwidth-bound ratio tends to "
        f"{kv_row / state_row:.1f}x; with the weights at these batches the floors give {floor_ratio:.1f}x. "
        f"RetNet's batch is bounded by {'the cap' if rt.batch == BATCH_CAP else 'memory'}; a bf16 state would halve "
        "its traffic, a longer context would lengthen the Llama's",
    )


def judged(part: Part, met: bool) -> bool | None:
    """A target's verdict: None in the dry run, whose figures mean nothing."""
    return None if part.dry_run else bool(met)


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class Trained:
    """One model's training step (milliseconds, bytes; ``peak`` NaN on the CPU) and two of its pieces timed alone,
    forward + backward at the same shape: the token mixer over every layer, and the output layer with the loss."""

    params: int
    step_ms: float
    tokens_per_s: float
    peak: float
    mixer_ms: float = math.nan
    loss_ms: float = math.nan

    def rest_ms(self) -> float:
        """The projections, norms, gate, rotation and AdamW: the step less its two pieces."""
        return self.step_ms - self.mixer_ms - self.loss_ms

    def flops_rate(self) -> float:
        """6 N FLOP per token (the projections' forward and backward), per second."""
        return 6 * self.params * self.tokens_per_s


def train_side(
    part: Part, label: str, config, tokens: int, add: Callable[[list], None], recompute: bool = False
) -> Trained | None:
    """Forward + backward + AdamW step on 1 x ``tokens`` tokens: time per step and peak memory; then the token mixer
    and the loss alone at the same shape, to place the time. With ``recompute``, every block's activations are
    recomputed in the backward (activation checkpointing), and the pieces, which it leaves as they are, are not
    timed again."""
    if part.out_of_time(reserve=25 if label == "RetNet" else 12):
        return None
    model = optimizer = None
    try:
        model = build(config, part.device, torch.bfloat16).train()
        if recompute:
            model.activation_checkpointing_enable()
        optimizer = build_optimizer(model, lr=1e-4)  # fused AdamW on the GPU, its states in bf16 as the parameters
        ids = torch.randint(0, config.vocab_size, (1, tokens), device=part.device)  # (1, T)

        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # kernels compiled, optimizer states allocated
        reset_peak(part.device)
        ms = cuda_ms(step, repeat=3)
        result = Trained(count_parameters(model), ms, tokens / ms * 1e3, peak_bytes(part.device))
    except Exception as e:
        part.error(f"{label} 1.3B training", e)
        return None
    finally:
        model = optimizer = None
        free_cuda()
    try:
        if not recompute:
            result.mixer_ms = backward_ms(*mixer_inputs(part, config, tokens)) * config.num_hidden_layers
            result.loss_ms = backward_ms(*loss_inputs(part, config, tokens))
    except Exception as e:
        part.error(f"{label} token mixer and loss alone", e)
    cells = [label, result.params / 1e9, ms, result.tokens_per_s, gib(result.peak), result.flops_rate() / 1e12]
    add([*cells, *([None] * 3 if recompute else [result.mixer_ms, result.loss_ms, result.rest_ms()])])
    return result


def backward_ms(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> float:
    """Milliseconds of ``fn(*inputs)`` and its backward from ``grad``: one warm-up call, then the median of 3."""
    run_once = lambda: fn(*inputs).backward(grad)
    run_once()
    return cuda_ms(run_once, repeat=3)


def mixer_inputs(part: Part, config, tokens: int) -> tuple[Callable, tuple, torch.Tensor]:
    """One layer's token mixer as the model calls it, on random bf16 q, k, v (1, H, T, D) of its head shapes: the
    chunkwise retention op (RetNet) or SDPA's causal attention (Llama)."""
    H = config.num_attention_heads
    if isinstance(config, RetNetConfig):
        dk, dv = config.head_dims
        mix = lambda q, k, v: retention(q, k, v, config.decay, mode="chunkwise", chunk_size=config.chunk_size)[0]
    else:
        dk = dv = config.hidden_size // H
        mix = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    kw = dict(device=part.device, dtype=torch.bfloat16)
    q, k, v = (torch.randn(1, H, tokens, d, **kw, requires_grad=True) for d in (dk, dk, dv))
    return mix, (q, k, v), torch.randn(1, H, tokens, dv, **kw)


def loss_inputs(part: Part, config, tokens: int) -> tuple[Callable, tuple, torch.Tensor]:
    """The output layer and the loss as each model computes them, on random bf16 hidden states (T, d): RetNet's
    blockwise ``linear_cross_entropy``, the Llama's bf16 logits made float32 for ``F.cross_entropy``."""
    d, V = config.hidden_size, config.vocab_size
    kw = dict(device=part.device, dtype=torch.bfloat16)
    targets = torch.randint(0, V, (tokens,), device=part.device)
    if isinstance(config, RetNetConfig):
        loss = lambda h, w: linear_cross_entropy(h, w, targets)
    else:
        loss = lambda h, w: F.cross_entropy(F.linear(h, w).float(), targets)
    h = torch.randn(tokens, d, **kw, requires_grad=True)
    w = (torch.randn(V, d, **kw) * d**-0.5).requires_grad_()
    return loss, (h, w), torch.ones((), device=part.device)


def training_target(
    part: Part, retnet: Trained | None, llama: Trained | None, retnet_vocab: int, ceilings: Ceilings
) -> None:
    """Tokens/s and peak memory against the target, with where the step's time goes on each side."""
    if retnet is None or llama is None:
        part.target(TRAIN_TARGET, None, "not measured", "a side's training step is missing (see notes)")
        return
    speedup, memory = retnet.tokens_per_s / llama.tokens_per_s, retnet.peak / llama.peak
    block = BLOCK_ELEMENTS.get(part.device, BLOCK_ELEMENTS["cuda"])
    rows = max(1, block // retnet_vocab)
    gaps = {  # where RetNet loses time, and what would win it back
        "the token mixer: faster chunkwise kernels would move it": retnet.mixer_ms - llama.mixer_ms,
        f"the output layer and loss: linear_cross_entropy takes blocks of {rows} rows at this vocabulary "
        f"({block:,} logits a block); a fused kernel would move it": retnet.loss_ms - llama.loss_ms,
        "the rest: fusing the gate, norms and rotation would move it": retnet.rest_ms() - llama.rest_ms(),
    }
    part.target(
        TRAIN_TARGET,
        judged(part, speedup >= TRAIN_SPEEDUP and memory <= 1),
        f"{speedup:.2f}x tokens/s ({retnet.tokens_per_s:,.0f} against {llama.tokens_per_s:,.0f}), "
        f"{memory:.2f}x the peak memory",
        f"a step, RetNet against Llama: {retnet.step_ms:.0f} against {llama.step_ms:.0f} ms, of which the token mixer "
        f"(chunkwise retention; FlashAttention) {retnet.mixer_ms:.0f} against {llama.mixer_ms:.0f} ms, the output "
        f"layer and loss (blockwise linear_cross_entropy; float32 logits) {retnet.loss_ms:.0f} against "
        f"{llama.loss_ms:.0f} ms, the rest {retnet.rest_ms():.0f} against {llama.rest_ms():.0f} ms: most of the gap "
        f"is in {max(gaps, key=gaps.get)}. 6N FLOP rates {retnet.flops_rate() / 1e12:.0f} and "
        f"{llama.flops_rate() / 1e12:.0f} TFLOP/s against a {ceilings.matmul / 1e12:.0f} TFLOP/s bf16 matmul",
    )
