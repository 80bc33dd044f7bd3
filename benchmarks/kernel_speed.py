"""Retention kernels on the GPU, side by side.

1. Chunkwise retention, forward + backward, bf16, T = 2k ... 32k, dk = 64, 128, 256: our Triton kernels
   (without and with the normalizations), fla's ``chunk_retention`` (if ``flash-linear-attention`` is
   installed), torch SDPA (FlashAttention, causal) and our plain PyTorch reference.
2. The decode step of retnet-1.3b (d 2048, 8 heads, dk 256, dv 512, 24 layers), bf16, batch 1, against
   its weight-read bound: weight bytes / memory bandwidth, the bandwidth measured here by a large
   device-to-device copy. Also the retention step alone (24 layers of state) against its state-read bound.

    python benchmarks/kernel_speed.py                 # on a CUDA GPU: the full run
    python benchmarks/kernel_speed.py --quick         # on a CUDA GPU: a few shapes
    python benchmarks/kernel_speed.py --interpret     # tiny shapes on the CPU (Triton's interpreter): checks the script

Times are medians of ``triton.testing.do_bench`` (CUDA events), in milliseconds; with --interpret they are
one wall-clock call each and mean nothing.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import table_row, table_rule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--interpret", action="store_true", help="tiny shapes on the CPU in Triton's interpreter")
    p.add_argument("--batch", type=int, default=2, help="batch size of the chunkwise runs")
    p.add_argument("--heads", type=int, default=8, help="heads of the chunkwise runs")
    p.add_argument("--out", default=None, help="also write the tables (markdown) to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are defined at import
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py: no CUDA device here, nothing measured. Run it on a GPU, or pass --interpret")
        print("to check the script on the CPU in Triton's interpreter (its times mean nothing).")
        return 0
    try:
        import triton
    except ImportError:
        print("benchmarks/kernel_speed.py: triton is not installed (pip install triton); nothing measured.")
        return 0

    device = "cpu" if args.interpret else "cuda"
    name = "CPU, Triton interpreter" if args.interpret else torch.cuda.get_device_name()
    lines = [f"Device: {name}; torch {torch.__version__}; triton {triton.__version__}", ""]
    lines += chunkwise_table(args, device)
    lines += ["", *decode_table(args, device)]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn: CUDA events on a GPU, one wall-clock call in the interpreter."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def fla_retention() -> Callable | None:
    """fla's chunk_retention taking (B, H, T, D) tensors, or None when flash-linear-attention is absent."""
    try:
        from fla.ops.retention import chunk_retention
    except ImportError:
        return None
    head_first = "head_first" in inspect.signature(chunk_retention).parameters
    kw = {"head_first": False} if head_first else {}

    def run(q, k, v):  # fla wants (B, T, H, D); the copies are made outside the timed region
        return chunk_retention(q, k, v, **kw)[0]

    return run


def chunkwise_table(args: argparse.Namespace, device: str) -> list[str]:
    import torch
    import torch.nn.functional as F

    from retentive.ops import retention

    bench = timer(device)
    fla = fla_retention() if device == "cuda" else None
    if args.interpret:
        lengths, dims, B, H = [48], [(16, 16)], 1, 2
    elif args.quick:
        lengths, dims, B, H = [2048, 16384], [(64, 64), (256, 256)], args.batch, args.heads
    else:
        lengths = [2048, 4096, 8192, 16384, 32768]
        dims, B, H = [(64, 64), (128, 128), (256, 256), (256, 512)], args.batch, args.heads

    def ours(normalize: bool):
        kw = dict(mode="chunkwise", chunk_size=64, backend="triton")
        return lambda q, k, v: retention(q, k, v, normalize_decay=normalize, normalize_retention=normalize, **kw)[0]

    def reference(q, k, v):
        return retention(q, k, v, mode="chunkwise", chunk_size=64, backend="torch")[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    columns = {"ours": ours(False), "ours+norm": ours(True), "fla": fla, "sdpa": sdpa, "reference": reference}
    header = ["T", "dk", "dv", *columns, "fla / ours", "ours: rel. err vs reference", "vs fla"]
    lines = [
        f"Chunkwise retention, forward + backward, bf16, batch {B}, {H} heads: median ms (fla: "
        f"{'installed' if fla else 'not installed'})",
        "",
        table_row(header),
        table_rule(len(header)),
    ]
    for Dk, Dv in dims:
        for T in lengths:
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (
                torch.randn(B, H, T, d, device=device, generator=gen, dtype=torch.bfloat16) for d in (Dk, Dk, Dv)
            )
            do = torch.randn(B, H, T, Dv, device=device, generator=gen, dtype=torch.bfloat16)
            times, outs = {}, {}
            for label, fn in columns.items():
                times[label] = "n/a"
                if fn is None or (label == "sdpa" and Dk != Dv):
                    continue
                bthd = label == "fla"
                x = [t.transpose(1, 2).contiguous() if bthd else t for t in (q, k, v)]
                x = [t.detach().requires_grad_() for t in x]
                g = do.transpose(1, 2).contiguous() if bthd else do

                def step(fn=fn, x=x, g=g):
                    for t in x:
                        t.grad = None
                    fn(*x).backward(g)

                try:
                    step()  # compiles and autotunes outside the timed region
                    times[label] = f"{bench(step):.3f}"
                    if label in ("ours", "fla", "reference"):
                        with torch.no_grad():
                            o = fn(*x).float()
                        outs[label] = o.transpose(1, 2) if bthd else o
                except Exception as e:  # out of memory, or a baseline refusing the shape: a cell, not a crash
                    times[label] = "oom" if "out of memory" in str(e) else f"error: {type(e).__name__}"
                finally:
                    x = g = None
                    if device == "cuda":
                        torch.cuda.empty_cache()
            speedup = "n/a"
            if "fla" in outs and "ours" in outs:
                speedup = f"{float(times['fla']) / float(times['ours']):.2f}x"
            errors = (relative_error(outs, "ours", "reference"), relative_error(outs, "ours", "fla"))
            row = [str(T), str(Dk), str(Dv), *times.values(), speedup, *errors]
            outs.clear()
            lines.append(table_row(row))
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def relative_error(outs: dict, a: str, b: str) -> str:
    """||outs[a] - outs[b]|| / ||outs[b]||, or n/a when either is missing."""
    if a not in outs or b not in outs:
        return "n/a"
    return f"{((outs[a] - outs[b]).norm() / outs[b].norm()).item():.1e}"


def bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (bytes read + bytes written)."""
    import torch

    if device != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = timer(device)(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def decode_table(args: argparse.Namespace, device: str) -> list[str]:
    import torch

    from retentive import RetNet
    from retentive.ops import RetentionState, log_gamma, retention
    from retentive.ops.triton import decode_step_

    bench = timer(device)
    layers, heads, d = (2, 2, 32) if args.interpret else (24, 8, 2048)
    dk, dv = d // heads, 2 * d // heads
    bw = bandwidth(device)
    lines = [
        f"Decode step, bf16, batch 1: {layers} layers, d {d}, {heads} heads, dk {dk}, dv {dv}; "
        f"measured copy bandwidth {bw / 1e9:.0f} GB/s",
        "",
        table_row(["what", "median ms", "bytes that must move", "bound ms", "time / bound"]),
        table_rule(5),
    ]

    def row(what: str, ms: float, nbytes: int) -> None:
        bound = nbytes / bw * 1e3
        lines.append(table_row([what, f"{ms:.3f}", f"{nbytes / 1e6:.1f} MB", f"{bound:.3f}", f"{ms / bound:.2f}"]))

    # the retention step alone, every layer's state read and written once
    gen = torch.Generator(device=device).manual_seed(0)
    states = [RetentionState.zeros(1, heads, dk, dv, device=device) for _ in range(layers)]
    q, k, v = (torch.randn(1, heads, 1, x, device=device, generator=gen, dtype=torch.bfloat16) for x in (dk, dk, dv))
    log_g = log_gamma("retnet", heads).to(device, torch.float32)
    kw = dict(normalize_decay=True, normalize_retention=True)
    state_bytes = sum(2 * (s.S.nbytes + s.z.nbytes) for s in states)

    def fused():
        for s in states:
            decode_step_(q, k, v, log_g, s, **kw)

    def through_retention(backend: str):
        for s in states:
            retention(q, k, v, mode="recurrent", state=s, output_state=True, backend=backend, **kw)

    with torch.no_grad():
        row(f"retention step, fused kernel in place x {layers} layers", bench(fused), state_bytes)
        for backend in ("triton", "torch"):
            ms = bench(lambda backend=backend: through_retention(backend))
            row(f"retention step, retention(backend={backend!r}) x {layers}", ms, state_bytes)

    # the whole backbone (retnet-1.3b has FFN 2d: 12 d^2 weights per layer)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPU group_norm refuses bf16 weights
    net = RetNet.from_options(layers, heads, d, 2 * d, value_factor=2).to(device, dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    with torch.no_grad():
        prompt = torch.randn(1, 16, d, device=device, dtype=dtype)
        _, state = net(prompt, mode="chunkwise", chunk_size=16, return_state=True)
        x = torch.randn(1, 1, d, device=device, dtype=dtype)

        def step():
            return net(x, mode="recurrent", state=state, return_state=True)

        row("backbone step, eager", bench(step), weight_bytes)
        if device == "cuda":
            lines.append(graph_row(step, bench, weight_bytes, bw))
    lines += ["", "Bound: the bytes over the measured copy bandwidth; the target is time / bound <= 2."]
    return lines


def graph_row(step: Callable[[], object], bench: Callable, weight_bytes: int, bw: float) -> str:
    """The backbone step replayed from a CUDA graph (no launch gaps), or why it could not be captured."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = bench(graph.replay)
    except Exception as e:  # capture fails on any host synchronization inside the step
        return f"| backbone step, CUDA graph | could not capture: {type(e).__name__}: {str(e)[:80]} | | | |"
    bound = weight_bytes / bw * 1e3
    return f"| backbone step, CUDA graph | {ms:.3f} | {weight_bytes / 1e6:.1f} MB | {bound:.3f} | {ms / bound:.2f} |"


if __name__ == "__main__":
    sys.exit(main())
