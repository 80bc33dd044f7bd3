"""Images/s and peak memory versus resolution: ViR (parallel / chunkwise / recurrent), RMT (MaSA / MaSAD), ViT.

    python benchmarks/vision.py          # 32 ... 512 px (and 1024 on a GPU); writes "Vision" in docs/benchmarks.md
    python benchmarks/vision.py --quick  # tiny models at 32 and 64 px (what the test runs)

What is measured: inference (``torch.no_grad``), float32, a batch of ``batch`` random RGB images, the median
wall time of ``repeats`` forward passes after one at the smallest resolution. Models of one size class:
ViR and its same-size ViT (``transformers``' ViTForImageClassification) with 16 x 16 patches, so the sequence
grows as (px / 16)^2 + 1 tokens; ViR's chunkwise and recurrent forms stream those tokens through the whole
stack carrying each layer's state. RMT with MaSA at every stage versus MaSAD at every stage (its stem makes a
px / 4 grid: MaSA's scores grow as (px / 4)^4, MaSAD's as (px / 4)^3).

Peak memory, CPU: in a worker process with glibc's mmap threshold fixed at 64 KiB (freed tensors
leave the resident set), ``VmHWM`` after a reset (``/proc/self/clear_refs``) minus ``VmRSS`` before the
forward pass: activations and outputs, not the weights or the input (Linux only). GPU:
``torch.cuda.max_memory_allocated`` minus the memory allocated before. A run whose memory or time,
extrapolated from the previous resolution, exceeds the limits is skipped and says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit

SECTION = "## Vision"
# name -> (family, form or attention, how memory grows with the resolution: exponent of px)
VARIANTS = {
    "ViR parallel": ("vir", "parallel", 4),
    "ViR chunkwise": ("vir", "chunkwise", 2),
    "ViR recurrent": ("vir", "recurrent", 2),
    "RMT MaSA": ("rmt", False, 4),
    "RMT MaSAD": ("rmt", True, 3),
    "ViT": ("vit", None, 4),
}
FULL = {"resolutions": [32, 64, 128, 256, 512], "gpu_resolutions": [1024], "batch": 4, "repeats": 3,
        "chunk_size": 64, "vir": {"dim_model": 192, "num_layers": 4, "num_heads": 3},
        "rmt": {"dim_model": (32, 64, 128, 256), "num_layers": (1, 1, 2, 1), "num_heads": (2, 2, 4, 8)}}  # fmt: skip
QUICK = {"resolutions": [32, 64], "gpu_resolutions": [], "batch": 2, "repeats": 1, "chunk_size": 8,
         "vir": {"dim_model": 32, "num_layers": 1, "num_heads": 2},
         "rmt": {"dim_model": (16, 32), "num_layers": (1, 1), "num_heads": (2, 2)}}  # fmt: skip


# ---- inside a worker process ----


def build(variant: str, px: int, cfg: dict) -> torch.nn.Module:
    from retentive.models import RMTConfig, RMTForImageClassification, ViRConfig, ViRForImageClassification
    from retentive.models.vit import vit_like

    family, option, _ = VARIANTS[variant]
    if family == "rmt":
        stages = len(cfg["rmt"]["dim_model"])
        rmt = RMTConfig(
            **cfg["rmt"], num_classes=10, heads_range=(4,) * stages, ffn_ratio=(3,) * stages,
            decomposed=(option,) * stages, layer_scales=(False,) * stages, projection=256,
        )  # fmt: skip
        return RMTForImageClassification(rmt)
    vir = ViRConfig(image_size=px, patch_size=16, num_classes=10, **cfg["vir"])
    return vit_like(vir) if family == "vit" else ViRForImageClassification(vir)


def forward(variant: str, px: int, cfg: dict, device: torch.device) -> dict:
    """Median seconds of a forward pass at ``px`` and the peak extra memory of the first one."""
    torch.manual_seed(0)
    model = build(variant, px, cfg).to(device).eval()
    images = torch.randn(cfg["batch"], 3, px, px, device=device)
    _, form, _ = VARIANTS[variant]
    kwargs = {"mode": form, "chunk_size": cfg["chunk_size"]} if VARIANTS[variant][0] == "vir" else {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        benchkit.reset_peak_rss()
        before = benchkit.rss_bytes()
    times = []
    with torch.no_grad():
        for i in range(cfg["repeats"]):
            t0 = time.perf_counter()
            model(images, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if i == 0:
                peak = (torch.cuda.max_memory_allocated() if cuda else benchkit.peak_rss_bytes()) - before
    seconds = statistics.median(times)
    return {"seconds": seconds, "images_per_s": cfg["batch"] / seconds, "peak_bytes": max(peak, 0)}


def sweep(variant: str, job: dict, device: torch.device) -> dict:
    """One variant at growing resolutions, skipping those whose extrapolated memory or time is too large."""
    cfg, power = job["cfg"], VARIANTS[variant][2]
    forward(variant, job["resolutions"][0], {**cfg, "repeats": 1}, device)  # one-time setup, not measured
    results, last = {}, None
    for px in job["resolutions"]:
        if last is not None:
            px0, r0 = last
            need = r0["peak_bytes"] * (px / px0) ** power
            secs = r0["seconds"] * (px / px0) ** power * cfg["repeats"]
            if need > job["max_gib"] * 2**30:
                results[str(px)] = {"skipped": f"needs ~{need / 2**30:.0f} GiB"}
                continue
            if secs > job["max_seconds"]:
                results[str(px)] = {"skipped": f"~{secs:.0f} s estimated"}
                continue
        results[str(px)] = forward(variant, px, cfg, device)
        last = (px, results[str(px)])
        print(f"{variant} {px} px: {results[str(px)]}", file=sys.stderr, flush=True)
    return results


def worker(job: dict) -> dict:
    """Every variant, one after the other, in this (worker) process."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    return {variant: sweep(variant, job, device) for variant in VARIANTS}


# ---- the driver ----


def markdown(command: str, host: str, threads: int, cfg: dict, results: dict, resolutions: list[int]) -> str:
    names = list(VARIANTS)
    lines = [
        SECTION,
        "",
        f"Command: `{command}`  ",
        f"Machine: {host}; torch {torch.__version__}, {threads} thread(s); "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.  ",
        f"Inference, float32, batch {cfg['batch']}, median of {cfg['repeats']} forward pass(es). ViR and ViT: "
        f"d={cfg['vir']['dim_model']}, {cfg['vir']['num_layers']} layers, {cfg['vir']['num_heads']} heads, "
        f"16 x 16 patches; ViR chunkwise in chunks of {cfg['chunk_size']} tokens. RMT: widths "
        f"{cfg['rmt']['dim_model']}, depths {cfg['rmt']['num_layers']}, MaSA or MaSAD at every stage. "
        "Peak: extra memory of one forward pass "
        "(see the docstring of `benchmarks/vision.py`). Plot: `docs/vision_throughput.png`.",
        "",
        benchkit.markdown_table(
            ["px", *(f"{n} {what}" for n in names for what in ("img/s", "peak MiB"))],
            [[str(px), *(c for n in names for c in cell(results[n][str(px)]))] for px in resolutions],
            align=":",
        ),
    ]
    return "\n".join(lines) + "\n"


def cell(r: dict) -> tuple[str, str]:
    """The two cells (images/s, peak MiB) of one measurement, or why it was skipped."""
    if "skipped" in r:
        return f"skipped: {r['skipped']}", "-"
    return f"{r['images_per_s']:.1f}", f"{r['peak_bytes'] / 2**20:.1f}"


def plot(results: dict, resolutions: list[int], path: Path) -> None:
    fig, (ax_speed, ax_mem) = benchkit.subplots(1, 2, figsize=(11, 4.2))
    for name, by_px in results.items():
        pts = [(px, by_px[str(px)]) for px in resolutions if "skipped" not in by_px[str(px)]]
        style = "--" if name.startswith("ViT") else "-"
        ax_speed.plot([p for p, _ in pts], [r["images_per_s"] for _, r in pts], style, marker="o", label=name)
        ax_mem.plot([p for p, _ in pts], [max(r["peak_bytes"], 1) / 2**20 for _, r in pts], style, marker="o")
    for ax, label in ((ax_speed, "images / s"), (ax_mem, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_speed.legend(fontsize=8)
    fig.suptitle("Vision backbones: inference throughput and memory versus resolution")
    benchkit.save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models at 32 and 64 px (a smoke run)")
    parser.add_argument("--out", type=Path, default=benchkit.DOCS / "benchmarks.md", help="markdown file to update")
    parser.add_argument("--plot", type=Path, default=benchkit.DOCS / "vision_throughput.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    benchkit.add_sweep_arguments(parser, max_seconds=60.0, max_seconds_help="skip a run estimated to take longer")
    args = parser.parse_args(argv)
    if args.worker:
        benchkit.answer_worker(worker, args.worker)
        return
    device = torch.device(args.device)
    if device.type == "cpu":
        benchkit.require_proc("vision.py")
    cfg = QUICK if args.quick else FULL
    resolutions = cfg["resolutions"] + (cfg["gpu_resolutions"] if device.type == "cuda" else [])
    command = "python benchmarks/vision.py" + (" --quick" if args.quick else "")
    command += f" --threads {args.threads}" if args.threads != 1 else ""
    host = benchkit.machine(args.device)
    job = {"cfg": cfg, "resolutions": resolutions, "threads": args.threads, "device": args.device,
           "max_gib": args.max_gib, "max_seconds": args.max_seconds}  # fmt: skip
    results = benchkit.run_worker(Path(__file__), job, env=benchkit.TRACKED_MEMORY_ENV, progress=True)
    section = markdown(command, host, args.threads, cfg, results, resolutions)
    benchkit.write_section(args.out, SECTION, section)
    plot(results, resolutions, args.plot)
    print(section)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
