"""Command line: ``retentive demo`` | ``retentive bench``."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from .models import RetNet


def demo(args: argparse.Namespace) -> None:
    """Run one RetNet in its three forms on the same input; show they agree and that decoding is O(1)."""
    torch.manual_seed(0)
    net = RetNet(num_layer=4, num_heads=4, dim_model=256).eval()
    x = torch.randn(1, 512, 256)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"RetNet: 4 layers, d=256, 4 heads, {n_params:,} parameters; input {tuple(x.shape)}")
    with torch.no_grad():
        for norm in (False, True):
            kw = {"normalize_attn": norm, "normalize_retn": norm}
            y = net(x, **kw)
            chunk = net(x, num_chunks=8, **kw)
            rec = net(x, mode="recurrent", **kw)
            print(
                f"  normalizations {'on ' if norm else 'off'}: max |parallel - chunkwise(8 chunks)| = "
                f"{(y - chunk).abs().max():.2e}, max |parallel - recurrent| = {(y - rec).abs().max():.2e}"
            )
        print("Recurrent decode step (one token, all layers) after a chunkwise prefill:")
        for context in args.contexts:
            _, state = net(torch.randn(1, context, 256), mode="chunkwise", chunk_size=256, return_state=True)
            step = torch.randn(1, 1, 256)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                _, state = net(step, mode="recurrent", state=state, return_state=True)
                times.append(time.perf_counter() - t0)
            times.sort()
            state_bytes = sum(s.nbytes() for s in state)
            print(f"  position {context:>6,}: {1e3 * times[len(times) // 2]:.3f} ms/token, state {state_bytes:,} bytes")


def bench(args: argparse.Namespace, extra: list[str]) -> None:
    """Run benchmarks/run.py (speed) or benchmarks/quality.py (``--quality``) from the source checkout."""
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / ("quality.py" if args.quality else "run.py")
    if not script.exists():
        raise SystemExit(f"retentive bench runs from a source checkout; {script} is missing (git clone the repository)")
    python = args.python or sys.executable
    extra = (["--quick"] if args.quick else []) + extra
    print(f"$ {python} {script.relative_to(root)} {' '.join(extra)}", flush=True)
    raise SystemExit(subprocess.call([python, str(script), *extra], cwd=root))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="retentive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the three forms agree; the recurrent step costs the same at any position")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 8192])
    p.add_argument("--steps", type=int, default=50)
    p.set_defaults(func=demo)
    p = sub.add_parser(
        "bench",
        help="RetNet vs the Transformer vs the peers: tables, JSON and plots in docs/ (other options go to the script)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--quality", action="store_true", help="the perplexity comparison instead of speed")
    p.add_argument("--python", help="the interpreter to run under (the peers' environment: .venv-peers/bin/python)")
    p.set_defaults(func=bench)
    args, extra = parser.parse_known_args(argv)
    if args.command != "bench" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "bench":
        args.func(args, extra)
    else:
        args.func(args)


if __name__ == "__main__":
    main()
