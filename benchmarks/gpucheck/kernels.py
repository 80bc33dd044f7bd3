"""Kernel speed, side by side in one run: the chunkwise form against flash-linear-attention and SDPA, the decode step
against its state-read bound, each against the two ceilings measured in the same run.

Chunkwise, bf16: ours (``retention(..., mode="chunkwise", backend="triton")``), fla's ``chunk_retention`` (when
flash-linear-attention imports) and torch SDPA (causal softmax attention, FlashAttention on Hopper), forward and
forward + backward, on fla's own benchmark shapes and RetNet's dv = 2 dk at dk 256. Each gets its inputs in its own
layout, made outside the timed region. The floor of a shape is the larger of its bytes over the copy bandwidth and
its matrix products over the matmul rate:

    bytes   forward: q, k, v read, o written once                        2 B T H (2 Dk + 2 Dv)  (bf16)
            fwd+bwd: also do read, dq, dk, dv written                    2 B T H (4 Dk + 4 Dv)
    FLOPs   forward: scores and their use inside a chunk of C tokens     2 B H T C (Dk + Dv)
                     the state read by q and updated by k, v             4 B H T Dk Dv
            fwd+bwd: three times the forward (two products per product)

The decode step (``decode_step_``, in place) at batch 1 to 64 for retnet-1.3b's heads (8 x dk 256 x dv 512), one
call per layer over 24 layers' states so the states do not sit in L2: its floor is reading and writing S and z.
Timed eager (the host launching each step) and replayed from a CUDA graph (the kernels alone, as `generate()`'s
compiled decoding runs them); the target is judged on the graph where there is one.
Then the whole retnet-1.3b backbone's step at batch 1, eager and replayed from a CUDA graph, against reading its
weights once. Then each kernel of the chunkwise form alone at dk 256, dv 512, against its own floor: where
forward + backward spend their time. Then, with what time is left, two settings the compiler alone cannot decide
(docs/benchmarks.md), each timed against the library's choice: 128-token chunks at dk 256 (half the chunk states'
traffic, and no spills at 8 warps), and float32's 32-wide head-dim tiles against bf16's 64-wide ones. Last, rows
that pack documents: forward + backward with retention's ``starts`` (the kernels compiled with HAS_DOCS) against the
same rows without, and against fla's varlen path (``cu_seqlens``) on the same documents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpucheck.harness import Ceilings, Part, capture, free_cuda, measure_ceilings, rel_err, timer
from retentive.ops import RetentionState, log_gamma, retention

# (B, T, H, Dk, Dv): fla's benchmark shapes, then RetNet's value width at dk 256
SHAPES = [
    (1, 8192, 96, 128, 128),
    (2, 16384, 16, 128, 128),
    (4, 2048, 16, 128, 128),
    (4, 4096, 64, 128, 128),
    (8, 2048, 32, 256, 256),
    (8, 1024, 8, 64, 64),
    (2, 8192, 8, 256, 512),
]
DRY_SHAPES = [(2, 80, 2, 16, 16), (1, 70, 2, 16, 32)]
CHUNK = 64
DECODE_HEADS, DECODE_DK, DECODE_DV, DECODE_LAYERS = 8, 256, 512, 24
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DECODE_TARGET = "decode step within 2x of its state-read bound at batch >= 16"
FLOAT32_SHAPE = (4, 2048, 16, 128, 128)  # (B, T, H, Dk, Dv)
PACKED_SHAPE = (4, 4096, 16, 128, 128)  # documents of random lengths, 512 tokens on average
BREAKDOWN_SHAPE = SHAPES[-1]  # RetNet's dk 256, dv 512: tuned already by chunkwise_speed
VARIANT_RESERVE = 35  # seconds a variant needs left: five kernels to compile and tune (~15 s), then its timing


def run(part: Part) -> None:
    ceilings = measure_ceilings(part.device)
    add = part.table(
        "Ceilings measured in this run",
        ["copy bandwidth (GB/s, read + write)", "bf16 matmul 8192^3 (TFLOP/s)"],
    )
    add([ceilings.bandwidth / 1e9, ceilings.matmul / 1e12])
    chunkwise_speed(part, ceilings)
    decode_speed(part, ceilings)
    backbone_step(part, ceilings)
    kernel_breakdown(part, ceilings)
    settings(part)
    packed_speed(part)


def forward_backward(fn: Callable, x: list[torch.Tensor], g: torch.Tensor) -> Callable[[], None]:
    """A call of ``fn(*x).backward(g)``, the gradients of ``x`` (leaves) cleared first: one forward + backward."""

    def both() -> None:
        for t in x:
            t.grad = None
        fn(*x).backward(g)

    return both


def fla_chunk(**kwargs: object) -> Callable | None:
    """fla's chunk_retention on (B, T, H, D) tensors (with ``kwargs``, e.g. its varlen ``cu_seqlens``), or None
    where flash-linear-attention is absent."""
    try:
        from fla.ops.retention import chunk_retention
    except ImportError:
        return None
    return lambda q, k, v: chunk_retention(q, k, v, **kwargs)[0]


def chunkwise_speed(part: Part, ceilings: Ceilings) -> None:
    bench = timer(part.device)
    fla = None if part.dry_run else fla_chunk()
    if fla is None:
        part.notes.append("flash-linear-attention not importable here: its columns are n/a")
    ours = lambda q, k, v: retention(q, k, v, mode="chunkwise", chunk_size=CHUNK, backend="triton")[0]
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    columns = {"ours": (ours, "bhtd"), "fla": (fla, "bthd"), "sdpa": (sdpa, "bhtd")}
    header = ["B", "T", "H", "Dk", "Dv", "pass"]
    header += [f"{c} ms" for c in columns] + ["floor ms", "ours / floor", "fla / ours", "ours vs fla err"]
    add = part.table("Chunkwise retention, bf16: median ms (fwd = forward, f+b = forward + backward)", header)
    ratios = {"f+b": [], "dk256": []}
    for B, T, H, Dk, Dv in DRY_SHAPES if part.dry_run else SHAPES:
        if part.out_of_time(reserve=25):
            break
        gen = torch.Generator(device=part.device).manual_seed(T + H)
        q, k, v = (
            torch.randn(B, H, T, d, device=part.device, generator=gen, dtype=torch.bfloat16) for d in (Dk, Dk, Dv)
        )
        do = torch.randn(B, H, T, Dv, device=part.device, generator=gen, dtype=torch.bfloat16)
        fwd_bytes, fb_bytes = 2 * B * T * H * (2 * Dk + 2 * Dv), 2 * B * T * H * (4 * Dk + 4 * Dv)
        fwd_flops = 2 * B * H * T * CHUNK * (Dk + Dv) + 4 * B * H * T * Dk * Dv
        floors = {
            "fwd": max(ceilings.bytes_ms(fwd_bytes), ceilings.flops_ms(fwd_flops)),
            "f+b": max(ceilings.bytes_ms(fb_bytes), ceilings.flops_ms(3 * fwd_flops)),
        }
        times: dict[str, dict[str, float | None]] = {"fwd": {}, "f+b": {}}
        outs = {}
        for label, (fn, layout) in columns.items():
            if fn is None or (label == "sdpa" and Dk != Dv):
                continue
            x = [t.transpose(1, 2).contiguous() if layout == "bthd" else t for t in (q, k, v)]
            x = [t.detach().requires_grad_() for t in x]
            g = do.transpose(1, 2).contiguous() if layout == "bthd" else do

            def forward(fn=fn, x=x):
                with torch.no_grad():
                    return fn(*x)

            both = forward_backward(fn, x, g)
            try:
                out = forward()  # compiles and autotunes outside the timed region
                both()
                outs[label] = (out.transpose(1, 2) if layout == "bthd" else out).float()
                times["fwd"][label] = bench(forward)
                times["f+b"][label] = bench(both)
            except Exception as e:  # out of memory, or a baseline refusing the shape: a cell, not a crash
                part.error(f"chunkwise {label} B{B} T{T} H{H} Dk{Dk} Dv{Dv}", e)
            finally:
                x = g = None
                free_cuda()
        err = rel_err(outs["ours"], outs["fla"]) if "ours" in outs and "fla" in outs else None
        if err is not None:
            part.check(f"ours vs fla output, B{B} T{T} H{H} Dk{Dk} Dv{Dv}", err, 2e-2)
        for name, row in times.items():
            o, f = row.get("ours"), row.get("fla")
            speedup = f / o if o and f else None
            if speedup is not None and name == "f+b":
                ratios["f+b"].append((speedup, (B, T, H, Dk, Dv)))
                if Dk == 256:
                    ratios["dk256"].append((speedup, (B, T, H, Dk, Dv)))
            cells = [row.get(c) for c in columns]
            add([B, T, H, Dk, Dv, name, *cells, floors[name], o / floors[name] if o else None, speedup, err])
        outs.clear()
        q = k = v = do = None
        free_cuda()
    chunk_targets(part, ratios)


def chunk_targets(part: Part, ratios: dict[str, list]) -> None:
    """At least as fast as fla at every shape (forward + backward), and 2x at dk 256."""
    if not ratios["f+b"]:
        part.target("chunkwise f+b >= fla at every shape", None, "fla not measured")
        return
    worst, shape = min(ratios["f+b"])
    part.target("chunkwise f+b >= fla at every shape", worst >= 1.0, f"worst fla/ours {worst:.2f}x at {shape}")
    if ratios["dk256"]:
        worst, shape = min(ratios["dk256"])
        part.target("chunkwise f+b >= 2x fla at dk 256", worst >= 2.0, f"worst fla/ours {worst:.2f}x at {shape}")


def decode_speed(part: Part, ceilings: Ceilings) -> None:
    """The fused decode step per layer, against reading and writing the layer's state once."""
    bench = timer(part.device)
    H, Dk, Dv, layers = (2, 16, 32, 3) if part.dry_run else (DECODE_HEADS, DECODE_DK, DECODE_DV, DECODE_LAYERS)
    batches = (1, 2) if part.dry_run else DECODE_BATCHES
    log_g = log_gamma("retnet", H).to(part.device, torch.float32)
    add = part.table(
        f"Decode step (decode_step_, in place), bf16 q/k/v, float32 state: {H} heads, dk {Dk}, dv {Dv}; per layer, "
        f"{layers} layers' states in turn",
        [
            "batch", "state MB (per layer)", "fused us", "fused us, CUDA graph", "torch backend us", "floor us",
            "fused / floor", "graph / floor",
        ],
    )  # fmt: skip
    ratios = []
    for B in batches:
        if part.out_of_time(reserve=8):
            break
        try:
            row = decode_row(part, B, H, Dk, Dv, layers, log_g, bench, ceilings)
            if B >= 16:  # the kernel's own time: from the graph where there is one (no host launch gaps)
                eager, graph = row[-2:]
                ratios.append((eager if graph is None else graph, eager, B))
            add(row)
        except Exception as e:
            part.error(f"decode step batch {B}", e)
        finally:
            free_cuda()
    if ratios:
        worst, eager, B = max(ratios)
        how = "" if part.device != "cuda" else f" from a CUDA graph (eager {eager:.2f}x)"
        part.target(DECODE_TARGET, worst <= 2.0, f"{worst:.2f}x at B{B}{how}")
    else:
        part.target(DECODE_TARGET, None, "not measured")


def decode_row(part: Part, B, H, Dk, Dv, layers, log_g, bench, ceilings) -> list:
    """[batch, state MB, fused us, fused us from a CUDA graph, torch us, floor us, fused / floor, graph / floor] for
    one batch size, per layer. Eager, the host may launch slower than the GPU runs a small step, and the gaps count;
    a CUDA graph of the layers' steps replays them without the host (None on the CPU)."""
    from retentive.ops.triton import decode_step_

    device = part.device
    kw = dict(normalize_decay=True, normalize_retention=True)
    gen = torch.Generator(device=device).manual_seed(B)
    states = []
    for _ in range(layers):
        s = RetentionState.zeros(B, H, Dk, Dv, offset=1000, device=device)
        s.S.normal_(generator=gen), s.z.normal_(generator=gen)
        states.append(s)
    q, k, v = (torch.randn(B, H, 1, d, device=device, generator=gen).bfloat16() for d in (Dk, Dk, Dv))
    nbytes = 2 * (states[0].S.nbytes + states[0].z.nbytes)  # read and written once

    def fused():
        for s in states:
            decode_step_(q, k, v, log_g, s, **kw)

    def torch_step():
        for s in states:
            retention(q, k, v, mode="recurrent", state=s, output_state=True, backend="torch", **kw)

    with torch.no_grad():
        fused_us = bench(fused) * 1e3 / layers
        graph_us = None
        if device == "cuda":
            try:
                graph_us = bench(capture(fused).replay) * 1e3 / layers
            except Exception as e:  # a step that cannot be captured: the eager figures stand
                part.error(f"decode step batch {B}, CUDA graph", e)
        torch_us = bench(torch_step) * 1e3 / layers
    floor_us = ceilings.bytes_ms(nbytes) * 1e3
    graph_ratio = graph_us / floor_us if graph_us is not None else None
    return [B, nbytes / 2 / 1e6, fused_us, graph_us, torch_us, floor_us, fused_us / floor_us, graph_ratio]


def backbone_step(part: Part, ceilings: Ceilings) -> None:
    """retnet-1.3b's backbone (24 layers, d 2048, FFN 4096), one token at batch 1 in bf16: eager and as a CUDA graph."""
    from retentive import RetNet

    if part.out_of_time(reserve=10):
        return
    layers, heads, d = (2, 2, 32) if part.dry_run else (24, 8, 2048)
    dtype = torch.float32 if part.dry_run else torch.bfloat16  # CPU group_norm refuses bf16 weights
    bench = timer(part.device)
    add = part.table(
        f"Backbone decode step, batch 1: {layers} layers, d {d}, {heads} heads (retnet-1.3b without embeddings)",
        ["how", "ms", "weights MB", "floor ms", "time / floor"],
    )
    try:
        net = RetNet.from_options(layers, heads, d, 2 * d, value_factor=2).to(part.device, dtype).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        floor = ceilings.bytes_ms(weight_bytes)
        with torch.no_grad():
            prompt = torch.randn(1, 16, d, device=part.device, dtype=dtype)
            _, state = net(prompt, mode="chunkwise", chunk_size=16, return_state=True)
            x = torch.randn(1, 1, d, device=part.device, dtype=dtype)
            step = lambda: net(x, mode="recurrent", state=state, return_state=True)
            ms = bench(step)
            add(["eager", ms, weight_bytes / 1e6, floor, ms / floor])
            if part.device == "cuda":
                graph = capture(step)
                ms = bench(graph.replay)
                add(["CUDA graph", ms, weight_bytes / 1e6, floor, ms / floor])
    except Exception as e:  # capture fails on any host synchronization inside the step: recorded, not fatal
        part.error("backbone decode step", e)
    finally:
        net = state = None
        free_cuda()


def kernel_breakdown(part: Part, ceilings: Ceilings) -> None:
    """Each kernel of the chunkwise form, bf16, launched alone: its time against its floor, the larger of the bytes it
    must move (each tensor once) over the copy bandwidth and the products it computes, recomputed ones included,
    over the matmul rate. For N = B H T tokens, C-token chunks, P = B H heads of NT chunks, nK and nV tiles of Dk
    and Dv (each chunk_output program recomputes the chunk's scores, each chunk_grad_qk program do v^T and each
    chunk_grad_v program k q^T):

        kernel             bytes (bf16: 2 each)                   FLOPs
        chunk_state        k, v read; h written                   2 N Dk Dv
        chunk_output       q, k, v, h read; o written             2 N C (Dk nV + Dv) + 2 N Dk Dv
        chunk_state_grad   q, do read; dh written                 2 N Dk Dv
        chunk_grad_qk      q, k, v, do, h, dh read; dq, dk        2 N C (Dv nK + 2 Dk) + 4 N Dk Dv
        chunk_grad_v       q, k, do, dh read; dv written          2 N C (Dk nV + Dv) + 2 N Dk Dv

    The backward runs chunk_state again (the states are recomputed, not kept), so forward + backward is the sum of
    all rows with chunk_state twice; the last row times the whole of it through ``retention()``, whose difference
    from that sum is what runs between the kernels."""
    from retentive.ops.triton.chunk_grad import chunk_grad_qk, chunk_grad_v
    from retentive.ops.triton.chunk_output import chunk_output
    from retentive.ops.triton.chunk_state import chunk_states
    from retentive.ops.triton.chunk_state_grad import chunk_state_grads
    from retentive.ops.triton.common import Tiling

    if part.out_of_time(reserve=15):
        return
    B, T, H, Dk, Dv = DRY_SHAPES[-1] if part.dry_run else BREAKDOWN_SHAPE
    bench = timer(part.device)
    add = part.table(
        f"Chunkwise retention by kernel, bf16, B{B} T{T} H{H} Dk{Dk} Dv{Dv}: each alone, median ms",
        ["kernel", "ms", "MB moved (each tensor once)", "GFLOP", "floor ms", "ms / floor"],
    )
    try:
        gen = torch.Generator(device=part.device).manual_seed(256)
        q, k, do = (torch.randn(B * H, T, d, device=part.device, generator=gen).bfloat16() for d in (Dk, Dk, Dv))
        v = torch.randn(B * H, T, Dv, device=part.device, generator=gen).bfloat16()
        log_g = log_gamma("retnet", H).to(part.device, torch.float32)
        t = Tiling.of(q, v, log_g, CHUNK)
        h, hz, _, _ = chunk_states(k, v, log_g, None, None, log_g, t)  # no documents: docs never read
        dS, dz = torch.zeros(t.BH, Dk, Dv, device=part.device), torch.zeros(t.BH, Dk, device=part.device)
        dh, dhz, _, _ = chunk_state_grads(q, do, do, log_g, dS, dz, log_g, t, False)  # without row sums: dr unread
        N, C, nK, nV = B * H * T, t.chunk, -(-Dk // t.BK), -(-Dv // t.BV)  # tiles: ceil
        tokens, states = 2 * N, 2 * B * H * t.NT * Dk * Dv  # bytes of one feature of every token; of h or dh

        kernels = [  # (name, launch, bytes, FLOPs)
            (
                "chunk_state",
                lambda: chunk_states(k, v, log_g, None, None, log_g, t),
                tokens * (Dk + Dv) + states,
                2 * N * Dk * Dv,
            ),
            (
                "chunk_output",
                lambda: chunk_output(q, k, v, h, hz, log_g, log_g, t, False),
                tokens * (2 * Dk + 2 * Dv) + states,
                2 * N * C * (Dk * nV + Dv) + 2 * N * Dk * Dv,
            ),
            (
                "chunk_state_grad",
                lambda: chunk_state_grads(q, do, do, log_g, dS, dz, log_g, t, False),
                tokens * (Dk + Dv) + states,
                2 * N * Dk * Dv,
            ),
            (
                "chunk_grad_qk",
                lambda: chunk_grad_qk(q, k, v, h, hz, do, do, dh, dhz, log_g, log_g, t, False),
                tokens * (4 * Dk + 2 * Dv) + 2 * states,
                2 * N * C * (Dv * nK + 2 * Dk) + 4 * N * Dk * Dv,
            ),
            (
                "chunk_grad_v",
                lambda: chunk_grad_v(q, k, v, do, dh, log_g, log_g, t),
                tokens * (2 * Dk + 2 * Dv) + states,
                2 * N * C * (Dk * nV + Dv) + 2 * N * Dk * Dv,
            ),
        ]
        total = 0.0
        for name, fn, nbytes, flops in kernels:
            ms = bench(fn)
            total += ms * (2 if name == "chunk_state" else 1)
            floor = max(ceilings.bytes_ms(nbytes), ceilings.flops_ms(flops))
            add([name, ms, nbytes / 1e6, flops / 1e9, floor, ms / floor])
        add(["sum, forward + backward (chunk_state twice)", total, None, None, None, None])
        x = [a.view(B, H, T, -1).detach().requires_grad_() for a in (q, k, v)]
        g = do.view(B, H, T, Dv)

        def whole() -> None:
            for a in x:
                a.grad = None
            retention(*x, mode="chunkwise", chunk_size=CHUNK, backend="triton")[0].backward(g)

        whole()
        add(["retention(), forward + backward", bench(whole), None, None, None, None])
    except Exception as e:
        part.error(f"chunkwise kernels alone, B{B} T{T} H{H} Dk{Dk} Dv{Dv}", e)
    finally:
        free_cuda()


def packed_speed(part: Part) -> None:
    """Forward + backward of rows that pack documents (starts at random, one token in 512 on average, or in T / 4 at
    the dry run's lengths): ours with
    ``starts`` against ours on the same rows read as one document each (what HAS_DOCS costs), and fla's
    chunk_retention on the same documents through its varlen ``cu_seqlens`` (the rows flattened into one)."""
    if part.out_of_time(reserve=VARIANT_RESERVE):
        part.notes.append("packed documents: not timed (out of time)")
        return
    B, T, H, Dk, Dv = DRY_SHAPES[0] if part.dry_run else PACKED_SHAPE
    bench = timer(part.device)
    gen = torch.Generator(device=part.device).manual_seed(512)
    q, k, v, do = (torch.randn(B, H, T, d, device=part.device, generator=gen).bfloat16() for d in (Dk, Dk, Dv, Dv))
    starts = torch.rand(B, T, device=part.device, generator=gen) < 1 / min(512, T // 4)
    starts[:, 0] = True
    cu_seqlens = F.pad(starts.flatten().nonzero().flatten(), (0, 1), value=B * T)  # documents of the flattened rows
    ours = lambda *x, **kw: retention(*x, mode="chunkwise", chunk_size=CHUNK, backend="triton", **kw)[0]
    fla = None if part.dry_run else fla_chunk(cu_seqlens=cu_seqlens)
    cases = {  # name: (fn, q, k, v and do in the layout it takes)
        "ours, each row one document": (ours, [q, k, v, do]),
        "ours, packed (starts)": (lambda *x: ours(*x, starts=starts), [q, k, v, do]),
    }
    if fla is not None:  # (1, B T, H, D): one row holding every document
        cases["fla, packed (cu_seqlens)"] = (fla, [t.transpose(1, 2).reshape(1, B * T, H, -1) for t in (q, k, v, do)])
    add = part.table(
        f"Packed documents, bf16 forward + backward: B{B} T{T} H{H} Dk{Dk} Dv{Dv}, {int(starts.sum())} documents",
        ["rows", "f+b ms", "/ ours without documents"],
    )
    first = None
    for name, (fn, (*x, g)) in cases.items():
        both = forward_backward(fn, [t.detach().requires_grad_() for t in x], g)
        try:
            both()  # compiles and tunes outside the timed region
            ms = bench(both)
            first = ms if first is None else first
            add([name, ms, ms / first])
        except Exception as e:
            part.error(f"packed documents, {name}", e)
        finally:
            free_cuda()


def settings(part: Part) -> None:
    """Chunks of 128 tokens against 64 at dk 256 (bf16), and float32's head-dim tiles against bf16's."""
    from retentive.ops.triton import common

    chunk_shape = (1, 300, 2, 64, 128) if part.dry_run else BREAKDOWN_SHAPE
    compare(part, "MAX_CHUNK", (common.MAX_CHUNK, 128), chunk_shape, torch.bfloat16, tol=2e-2)
    tile_shape = (1, 70, 2, 64, 64) if part.dry_run else FLOAT32_SHAPE
    compare(part, "MAX_TILE_FLOAT32", (common.MAX_TILE_FLOAT32, common.MAX_TILE), tile_shape, torch.float32, tol=1e-5)


def compare(part: Part, name: str, values: tuple, shape: tuple, dtype: torch.dtype, tol: float) -> None:
    """retention() forward and forward + backward at ``shape`` (B, T, H, Dk, Dv) in ``dtype``, chunks of
    ``common.MAX_CHUNK`` tokens, under each value of ``common.<name>``, the library's own first: median ms, the
    ratio to the first, and o, dq, dk, dv checked against the first's (the same sums in another order)."""
    from retentive.ops.triton import common

    B, T, H, Dk, Dv = shape
    kind = str(dtype).removeprefix("torch.")
    bench = timer(part.device)
    add = part.table(
        f"Chunkwise retention, {kind}, by {name}: B{B} T{T} H{H} Dk{Dk} Dv{Dv}, median ms",
        [name, "fwd ms", "f+b ms", "fwd / the library's", "f+b / the library's"],
    )
    gen = torch.Generator(device=part.device).manual_seed(T)
    q, k, v, do = (torch.randn(B, H, T, d, device=part.device, generator=gen).to(dtype) for d in (Dk, Dk, Dv, Dv))
    x = [t.requires_grad_() for t in (q, k, v)]

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return retention(*x, mode="chunkwise", chunk_size=common.MAX_CHUNK, backend="triton")[0]

    both = forward_backward(
        lambda *x: retention(*x, mode="chunkwise", chunk_size=common.MAX_CHUNK, backend="triton")[0], x, do
    )

    default, times, outs = getattr(common, name), [], []
    for value in values:
        if part.out_of_time(reserve=VARIANT_RESERVE):
            break
        setattr(common, name, value)
        try:
            o = forward()  # compiles and tunes outside the timed region
            both()
            outs.append([o, *(t.grad.clone() for t in x)])
            times.append((bench(forward), bench(both)))
            ratios = [ms / first for ms, first in zip(times[-1], times[0], strict=True)]
            add([value, *times[-1], *ratios])
        except Exception as e:
            part.error(f"{kind} chunkwise with {name} = {value}", e)
            break
        finally:
            setattr(common, name, default)
            free_cuda()
    if len(outs) == 2:
        for label, first, other in zip(("o", "dq", "dk", "dv"), *outs, strict=True):
            part.check(f"{kind} chunkwise {label}, {name} = {values[1]} vs {values[0]}", rel_err(other, first), tol)
