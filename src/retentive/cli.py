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


def train_vision(args: argparse.Namespace) -> None:
    """Train ViR, RMT or the ViT baseline on an offline image dataset; report test accuracy and time."""
    import logging

    from .training import TrainConfig
    from .training.vision import VisionConfig, steps_for_epochs
    from .training.vision import train_vision as run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    vision = VisionConfig(
        model=args.model, data=args.data, data_root=args.data_root, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, seed=args.seed,
    )  # fmt: skip
    train_size = {"fashion-mnist": 60_000, "digits": 1_438}[args.data]
    steps = args.steps or steps_for_epochs(args.epochs, train_size, args.batch_size)
    config = TrainConfig(
        steps=steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval, ckpt_interval=args.ckpt_interval, log_interval=args.log_interval,
        device=args.device, perplexity=False, progress=not args.no_progress,
    )  # fmt: skip
    result = run(vision, config, args.out, resume=args.resume, overwrite=args.overwrite).result
    acc = result.eval.get("val_accuracy", float("nan"))
    print(f"{args.model} on {args.data}: test accuracy {acc:.4f} after {steps} steps, {result.seconds:.0f} s training")
    print(f"checkpoint: {result.checkpoint}")


def _add_train_vision(sub: argparse._SubParsersAction) -> None:
    from .data import IMAGE_DATASETS
    from .training.vision import VISION_MODELS

    p = sub.add_parser("train-vision", help="train ViR / RMT / the ViT baseline on Fashion-MNIST or digits")
    p.add_argument("--model", choices=VISION_MODELS, default="vir-tiny")
    p.add_argument("--data", choices=IMAGE_DATASETS, default="fashion-mnist")
    p.add_argument("--data-root", default=None, help="directory of Fashion-MNIST's idx files (default: Debian's)")
    p.add_argument("--out", default=None, help="run directory (default runs/<model>-<data>)")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the training set (unless --steps)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--ckpt-interval", type=int, default=200)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete what --out holds and start afresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=train_vision)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="retentive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the three forms agree; the recurrent step costs the same at any position")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 8192])
    p.add_argument("--steps", type=int, default=50)
    p.set_defaults(func=demo)
    _add_train_vision(sub)
    args = parser.parse_args(argv)
    if args.command == "train-vision" and args.out is None:
        args.out = f"runs/{args.model}-{args.data}"
    args.func(args)


if __name__ == "__main__":
    main()
