"""Command line: ``retentive demo``."""

from __future__ import annotations

import argparse
import time

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="retentive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the three forms agree; the recurrent step costs the same at any position")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 8192])
    p.add_argument("--steps", type=int, default=50)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
