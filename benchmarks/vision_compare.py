"""RMT-T beside standard image classifiers of its size at 224 x 224: images/s and peak memory, inference and training.

    python benchmarks/vision_compare.py          # writes "Vision: RMT-T beside ConvNeXt V2 and DeiT" in benchmarks.md
    python benchmarks/vision_compare.py --quick  # 32 px, batch 2 (what the test runs)

Each model runs in its own worker process (glibc's mmap threshold at 64 KiB, so freed tensors leave the resident
set; peak = ``VmHWM`` after a reset minus ``VmRSS`` before, as in ``benchmarks/vision.py``), float32, random
weights and images, 1,000 classes. Inference: the median of ``repeats`` forward passes under ``torch.no_grad`` after
one; training: the median of ``repeats`` forward + backward passes of the cross-entropy on random labels after one
(no optimizer step: its cost is the same per parameter for every model). RMT-T as released uses MaSAD (the
decomposed attention) in stages 1-2 and MaSA in stages 3-4; it is also measured with each at every stage. The
standard models are transformers' ConvNeXt V2-nano (15.6 M parameters) and DeiT-S (its ViT class, 22.1 M).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit

SECTION = "## Vision: RMT-T beside ConvNeXt V2 and DeiT"
MODELS = (
    "RMT-T (as released)",
    "RMT-T, MaSA at every stage",
    "RMT-T, MaSAD at every stage",
    "ConvNeXt V2-nano",
    "DeiT-S",
)
FULL = {"px": 224, "batch": 8, "repeats": 3}
QUICK = {"px": 32, "batch": 2, "repeats": 1}


def build(name: str, px: int) -> torch.nn.Module:
    """The model ``name`` with random weights, 1,000 classes, for ``px`` x ``px`` images."""
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification, ViTConfig, ViTForImageClassification

    from retentive.models import RMTConfig, RMTForImageClassification

    if name.startswith("RMT-T"):
        stages = {"MaSA at": (False,) * 4, "MaSAD at": (True,) * 4}
        decomposed = next((d for key, d in stages.items() if key in name), None)
        overrides = {"decomposed": decomposed} if decomposed else {}
        return RMTForImageClassification(RMTConfig.from_preset("rmt-t", num_classes=1000, **overrides))
    if name == "ConvNeXt V2-nano":
        config = ConvNextV2Config(depths=[2, 2, 8, 2], hidden_sizes=[80, 160, 320, 640], num_labels=1000)
        return ConvNextV2ForImageClassification(config)
    config = ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=px,
        num_labels=1000,
    )  # fmt: skip
    return ViTForImageClassification(config)


def logits_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def measure(name: str, cfg: dict) -> dict:
    """Inference and training images/s and peak extra memory of model ``name`` (in this worker process)."""
    torch.manual_seed(0)
    model = build(name, cfg["px"])
    images = torch.randn(cfg["batch"], 3, cfg["px"], cfg["px"])
    labels = torch.randint(0, 1000, (cfg["batch"],))
    out = {"parameters": sum(p.numel() for p in model.parameters())}

    def infer() -> None:
        with torch.no_grad():
            model(images)

    def train() -> None:
        model.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(logits_of(model(images)), labels).backward()

    for task, step, mode in (("inference", infer, model.eval), ("training", train, model.train)):
        mode()
        step()  # one-time setup, and the gradients allocated before the measured peak
        benchkit.reset_peak_rss()
        before = benchkit.rss_bytes()
        times = []
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        peak = benchkit.peak_rss_bytes() - before
        seconds = statistics.median(times)
        out[task] = {"images_per_s": cfg["batch"] / seconds, "peak_bytes": max(peak, 0)}
        print(f"{name} {task}: {out[task]}", file=sys.stderr, flush=True)
    return out


def worker(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    return measure(job["model"], job["cfg"])


def markdown(command: str, host: str, threads: int, cfg: dict, results: dict) -> str:
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "-", r["error"], "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{r['parameters'] / 1e6:.1f}",
                *(f"{r[task]['images_per_s']:.1f}" for task in ("inference", "training")),
                *(f"{r[task]['peak_bytes'] / 2**20:.0f}" for task in ("inference", "training")),
            ]
        )
    header = ["model", "M params", "inference img/s", "training img/s", "inference peak MiB", "training peak MiB"]
    return "\n".join(
        [
            SECTION,
            "",
            f"`{command}` ({host}; torch {torch.__version__}, {threads} thread(s)). Float32, batch {cfg['batch']}, "
            f"{cfg['px']} x {cfg['px']}, random weights, 1,000 classes; median of {cfg['repeats']} passes after "
            "one; training is forward + backward (no optimizer step); peak: extra resident memory of the measured "
            "passes (see the docstring of `benchmarks/vision_compare.py`).",
            "",
            benchkit.markdown_table(header, rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 px, batch 2, one pass (a smoke run)")
    parser.add_argument("--out", type=Path, default=benchkit.DOCS / "benchmarks.md", help="markdown file to update")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker")
    benchkit.add_worker_argument(parser)
    args = parser.parse_args(argv)
    if args.worker:
        benchkit.answer_worker(worker, args.worker)
        return
    benchkit.require_proc("vision_compare.py")
    cfg = QUICK if args.quick else FULL
    host = benchkit.machine()  # the load average before the run
    results = {}
    for name in MODELS:
        job = {"model": name, "cfg": cfg, "threads": args.threads}
        try:
            results[name] = benchkit.run_worker(Path(__file__), job, env=benchkit.TRACKED_MEMORY_ENV, progress=True)
        except benchkit.WorkerFailed as err:
            results[name] = {"error": str(err)}
    command = "python benchmarks/vision_compare.py" + (" --quick" if args.quick else "")
    section = markdown(command, host, args.threads, cfg, results)
    if not args.quick:
        benchkit.write_section(args.out, SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
