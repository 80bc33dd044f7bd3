"""RMT as the backbone of transformers' UperNet, beside ConvNeXt and Swin of the same widths and depths: semantic
segmentation learned from scratch under one recipe, on scenes built from Fashion-MNIST (offline).

    python benchmarks/segmentation.py          # writes "Segmentation: RMT in UperNet" in docs/benchmarks.md
    python benchmarks/segmentation.py --quick  # a few steps on small scenes (what the test runs)

The task: each scene is a 64 x 64 grayscale canvas holding four Fashion-MNIST items, one per quadrant at a random
offset; every pixel of an item brighter than ``INK`` is labelled with the item's class (1-10), the rest background
(0). Training scenes come from the training split, test scenes from the test split, both drawn with fixed seeds.

The models: transformers' ``UperNetForSemanticSegmentation`` (no auxiliary head) on three backbones of three stages
with the same widths (32, 64, 128) and blocks (1, 2, 1), maps at strides 4, 8 and 16: retentive's RMT (MaSAD in the
first stage and MaSA after, as rmt-tiny), transformers' ConvNeXt and Swin (windows of 4 x 4). Each trains with
AdamW (lr 1e-3, weight decay 0.05, 20 warm-up steps, cosine), batch 16, float32, seeds 0 and 1, on one torch
thread, the models in turn. Reported: the mean IoU over the 11 classes and the pixel accuracy on the test scenes
(mean and spread of the seeds), the parameters, and the median training step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit

SECTION = "## Segmentation: RMT in UperNet"
MODELS = ("RMT", "ConvNeXt", "Swin")
FULL = {"side": 64, "steps": 600, "batch": 16, "train_scenes": 8192, "test_scenes": 1024, "seeds": (0, 1)}
QUICK = {"side": 32, "steps": 3, "batch": 2, "train_scenes": 8, "test_scenes": 4, "seeds": (0,)}
WIDTHS, DEPTHS, HEADS = (32, 64, 128), (1, 2, 1), (2, 4, 8)
CLASSES = 11  # background and the ten garments
INK = 0.2  # an item's pixel belongs to it above this brightness (in [0, 1])


def scenes(images: torch.Tensor, labels: torch.Tensor, count: int, side: int, seed: int) -> tuple:
    """``count`` scenes (count, 1, side, side), normalized, and their masks (count, side, side): four items of
    ``images`` (N, 28, 28) in [0, 1] at random offsets in the four quadrants, then resized to ``side``."""
    gen = torch.Generator().manual_seed(seed)
    canvas, mask = torch.zeros(count, 64, 64), torch.zeros(count, 64, 64, dtype=torch.long)
    picks = torch.randint(len(images), (count, 4), generator=gen)
    offsets = torch.randint(0, 5, (count, 4, 2), generator=gen)
    for n in range(count):
        for q in range(4):
            y, x = 32 * (q // 2) + offsets[n, q, 0], 32 * (q % 2) + offsets[n, q, 1]
            item = images[picks[n, q]]
            canvas[n, y : y + 28, x : x + 28] = item
            mask[n, y : y + 28, x : x + 28] = torch.where(item > INK, labels[picks[n, q]] + 1, 0)
    if side != 64:
        canvas = F.interpolate(canvas[:, None], size=side, mode="bilinear", antialias=True)[:, 0]
        mask = F.interpolate(mask[:, None].float(), size=side, mode="nearest")[:, 0].long()
    return ((canvas - 0.286) / 0.353)[:, None], mask


def build(name: str, side: int):
    """UperNet on the backbone ``name``, random weights."""
    from transformers import ConvNextConfig, SwinConfig, UperNetConfig, UperNetForSemanticSegmentation

    from retentive.models import RMTConfig

    stages = [f"stage{i + 1}" for i in range(len(WIDTHS))]
    if name == "RMT":
        backbone = RMTConfig.from_preset(
            "rmt-tiny", dim_model=WIDTHS, num_layers=DEPTHS, num_heads=HEADS, image_size=side, out_features=stages
        )
    elif name == "ConvNeXt":
        backbone = ConvNextConfig(
            num_channels=1, hidden_sizes=list(WIDTHS), depths=list(DEPTHS), num_stages=3, out_features=stages
        )
    else:
        backbone = SwinConfig(
            image_size=side, patch_size=4, num_channels=1, embed_dim=WIDTHS[0], depths=list(DEPTHS),
            num_heads=list(HEADS), window_size=4, out_features=stages,
        )  # fmt: skip
    config = UperNetConfig(
        backbone_config=backbone, num_labels=CLASSES, hidden_size=64, pool_scales=(1, 2), use_auxiliary_head=False
    )
    return UperNetForSemanticSegmentation(config)


def learning_rate(step: int, steps: int, peak: float = 1e-3, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def scores(predicted: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """The mean IoU over the classes present in ``mask`` or ``predicted``, and the pixel accuracy."""
    ious = []
    for c in range(CLASSES):
        union = ((predicted == c) | (mask == c)).sum()
        if union:
            ious.append((((predicted == c) & (mask == c)).sum() / union).item())
    return statistics.mean(ious), (predicted == mask).float().mean().item()


def train(name: str, data: dict, cfg: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build(name, cfg["side"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    images, masks = data["train"]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    times = []
    model.train()
    for step in range(cfg["steps"]):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg["steps"])
        rows = order[(step * cfg["batch"] + torch.arange(cfg["batch"])) % len(images)]
        start = time.perf_counter()
        loss = model(images[rows], labels=masks[rows]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    model.eval()
    images, masks = data["test"]
    with torch.no_grad():
        predicted = torch.cat([model(images[i : i + 64]).logits.argmax(1) for i in range(0, len(images), 64)])
    miou, accuracy = scores(predicted, masks)
    params = sum(p.numel() for p in model.parameters())
    return {"miou": miou, "accuracy": accuracy, "params": params, "step_ms": 1e3 * statistics.median(times)}


def markdown(env: dict, host: str, cfg: dict, results: dict) -> str:
    def spread(values: list[float]) -> str:
        mean = 100 * statistics.mean(values)
        return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * (max(values) - min(values)) / 2:.1f}"

    rows = [
        (
            name,
            f"{runs[0]['params'] / 1e6:.2f} M",
            spread([r["miou"] for r in runs]),
            spread([r["accuracy"] for r in runs]),
            f"{statistics.median(r['step_ms'] for r in runs):,.0f}",
        )
        for name, runs in results.items()
    ]
    table = benchkit.markdown_table(
        ("UperNet on", "parameters", "test mIoU (%)", "pixel accuracy (%)", "training step (ms)"), rows, ":"
    )
    return (
        f"Command: `{env['command']}` ({host}, 1 torch thread; torch {env['versions']['torch']}, transformers "
        f"{env['versions']['transformers']}; {env['date']}). Scenes of {cfg['side']} x {cfg['side']} px, "
        f"{cfg['train_scenes']:,} for training, {cfg['steps']} steps of "
        f"{cfg['batch']}, {cfg['test_scenes']:,} test scenes, seeds {', '.join(map(str, cfg['seeds']))} (mean "
        "± half the range).\n\n" + table + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on small scenes (what the test runs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started = time.time()
    torch.set_num_threads(1)
    from retentive.data.images import fashion_mnist_dir, read_idx

    root = fashion_mnist_dir()
    host, data = benchkit.machine(), {}
    for split, prefix, seed in (("train", "train", 0), ("test", "t10k", 1)):
        items = torch.from_numpy(read_idx(root / f"{prefix}-images-idx3-ubyte.gz").copy()).float() / 255
        labels = torch.from_numpy(read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
        data[split] = scenes(items, labels, cfg[f"{split}_scenes"], cfg["side"], seed)
    results = {}
    for name in MODELS:
        results[name] = [train(name, data, cfg, seed) for seed in cfg["seeds"]]
        print(name, results[name], flush=True)
    env = benchkit.environment("segmentation.py", started, args.quick, sys.argv[1:] if argv is None else argv)
    text = markdown(env, host, cfg, results)
    benchkit.write_section(args.out, SECTION, text, name="segmentation")
    print(text)


if __name__ == "__main__":
    main()
