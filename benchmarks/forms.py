"""Forward+backward time and peak memory of the three forms of retention, side by side.

    python benchmarks/forms.py          # T = 512 ... 16,384; writes "Retention forms" in docs/benchmarks.md
    python benchmarks/forms.py --quick  # tiny sizes (what the test runs)

What is measured: ``retentive.ops.retention`` on one row of H=4 heads, dk=64, dv=128 (the retention of a
d=256 layer with value_factor 2), float32, both normalizations on, then ``.backward()`` of a random linear
loss: the median wall time of a few repeats, and the peak extra resident memory of the first run.

Peak memory on a CPU: tracemalloc does not see torch's allocations, so the measurements run in a
worker process started with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): every
buffer above that is its own mapping, returned to the system when freed, so resident memory follows
live tensors. Each form first runs once at a tiny length (one-time setup); before each measured run the
worker resets the kernel's high-water mark (``/proc/self/clear_refs``) and reads the resident size; the
peak is ``VmHWM - VmRSS before``: inputs excluded; outputs, saved activations and gradients included.
Linux only.

It also checks two claims and prints PASS or FAIL: the chunkwise form's cost grows linearly
(16x the tokens costs at most 20x the time) and the recurrent step's cost does not grow with the
position (the step at the last position within 1.2x of the first).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from retentive.ops import retention

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit

SECTION = "## Retention forms"
FULL = {
    "lengths": [512, 1024, 2048, 4096, 8192, 16384],
    "heads": 4,
    "dk": 64,
    "dv": 128,
    "chunk_size": 64,
    "repeats": 3,
    "steps": 200,
}
QUICK = {"lengths": [16, 32, 64, 128, 256], "heads": 4, "dk": 16, "dv": 32, "chunk_size": 16, "repeats": 1, "steps": 20}
NORMS = {"normalize_decay": True, "normalize_retention": True}
FORMS = ("parallel", "chunkwise", "recurrent", "decode")  # decode: the recurrent step at growing positions


# ---- inside a worker process ----


def _inputs(cfg: dict, T: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    H, dk, dv = cfg["heads"], cfg["dk"], cfg["dv"]
    return tuple(torch.randn(1, H, T, d, requires_grad=requires_grad) for d in (dk, dk, dv))


def fwd_bwd(mode: str, T: int, cfg: dict, repeats: int) -> dict:
    """Peak extra memory of one forward+backward, then the median time of ``repeats`` more."""
    q, k, v = _inputs(cfg, T, requires_grad=True)
    w = torch.randn(1, cfg["heads"], T, cfg["dv"])

    def run() -> float:
        t0 = time.perf_counter()
        o, _ = retention(q, k, v, mode=mode, chunk_size=cfg["chunk_size"], **NORMS)
        (o * w).sum().backward()
        q.grad = k.grad = v.grad = None
        return time.perf_counter() - t0

    benchkit.reset_peak_rss()
    before = benchkit.rss_bytes()
    first = run()
    peak = max(0, benchkit.peak_rss_bytes() - before)
    del first  # the first run pays for one-time setup: time the repeats
    return {"seconds": statistics.median(run() for _ in range(repeats)), "peak_bytes": peak, "repeats": repeats}


def decode_steps(cfg: dict) -> dict:
    """Median time of one recurrent step (T=1) after a chunkwise prefill to each position, interleaved."""
    states = {}
    with torch.no_grad():
        for P in cfg["lengths"]:
            _, states[P] = retention(
                *_inputs(cfg, P, False), mode="chunkwise", chunk_size=256, output_state=True, **NORMS
            )
        step = _inputs(cfg, 1, False)
        times: dict[int, list[float]] = {P: [] for P in cfg["lengths"]}
        for _ in range(cfg["steps"]):  # round-robin over positions: load on the machine hits them alike
            for P, state in states.items():
                t0 = time.perf_counter()
                retention(*step, mode="recurrent", state=state, output_state=True, **NORMS)
                times[P].append(time.perf_counter() - t0)
    nbytes = {P: s.nbytes() for P, s in states.items()}
    return {str(P): {"seconds": statistics.median(t), "state_bytes": nbytes[P]} for P, t in times.items()}


FLOOR = {"peak_bytes": 2**20, "seconds": 0.01}  # below these, a measured growth is noise


def extrapolate(history: list[tuple[int, dict]], T: int, key: str, power: float) -> float:
    """``key`` at length T from the last measurements, growing as T^p with p at least ``power`` (more,
    up to 3, where the last two measurements grew faster, as the recurrent form's backward does)."""
    T1, r1 = history[-1]
    if len(history) > 1 and history[-2][1][key] > FLOOR[key]:
        T0, r0 = history[-2]
        power = min(3.0, max(power, math.log(r1[key] / r0[key]) / math.log(T1 / T0)))
    return r1[key] * (T / T1) ** power


def measure_form(form: str, job: dict) -> dict:
    """Measure one form at growing T; skip a T whose memory or time, extrapolated, exceeds the limits."""
    cfg = job["cfg"]
    torch.manual_seed(0)
    if form == "decode":
        return decode_steps(cfg)
    fwd_bwd(form, 8, cfg, repeats=1)  # one-time setup (kernels, autograd threads) outside the measurements
    power = 2 if form == "parallel" else 1  # T x T scores; state and loops are linear
    results, history = {}, []
    for T in cfg["lengths"]:
        repeats = cfg["repeats"]
        if history:
            need = extrapolate(history, T, "peak_bytes", power)
            one = extrapolate(history, T, "seconds", power)
            repeats = min(repeats, int(job["max_seconds"] / one) - 1)  # fewer repeats where one run is long
            if need > job["max_gib"] * 2**30:
                results[str(T)] = {"skipped": f"needs ~{need / 2**30:.1f} GiB (extrapolated)"}
                continue
            if repeats < 1:
                results[str(T)] = {"skipped": f"~{one:.0f} s per run (extrapolated)"}
                continue
        results[str(T)] = fwd_bwd(form, T, cfg, repeats)
        history.append((T, results[str(T)]))
    return results


def worker(job: dict) -> dict:
    """Every form, one after the other, in this (worker) process."""
    torch.set_num_threads(job["threads"])
    results = {}
    for form in FORMS:
        t0 = time.perf_counter()
        results[form] = measure_form(form, job)
        print(f"{form}: measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return results


# ---- the driver ----


def cell(r: dict) -> tuple[str, str]:
    if "skipped" in r:
        return f"skipped: {r['skipped']}", "-"
    return f"{1e3 * r['seconds']:.1f}", f"{r['peak_bytes'] / 2**20:.1f}"


def claims(results: dict, decode: dict, lengths: list[int]) -> list[tuple[str, bool]]:
    """(description, holds) for the linear chunkwise cost and the position-independent recurrent step."""
    out = []
    chunk = results["chunkwise"]
    for T0 in lengths:
        T1 = 16 * T0
        if T1 in lengths and "seconds" in chunk[str(T0)] and "seconds" in chunk[str(T1)]:
            ratio = chunk[str(T1)]["seconds"] / chunk[str(T0)]["seconds"]
            out.append((f"chunkwise fwd+bwd: T={T1:,} costs {ratio:.1f}x T={T0:,} (at most 20x)", ratio <= 20))
    first, last = decode[str(lengths[0])]["seconds"], decode[str(lengths[-1])]["seconds"]
    ratio = last / first
    out.append(
        (
            f"recurrent step: position {lengths[-1]:,} costs {ratio:.2f}x position {lengths[0]:,} (at most 1.2x)",
            ratio <= 1.2,
        )
    )
    return out


def markdown(args: argparse.Namespace, cfg: dict, results: dict, decode: dict, checks: list, host: str) -> str:
    forms = [("parallel", "parallel"), ("chunkwise", f"chunkwise ({cfg['chunk_size']})"), ("recurrent", "recurrent")]
    lines = [
        SECTION,
        "",
        f"Command: `{args.command}`  ",
        f"Machine: {host}; torch {torch.__version__}, {args.threads} thread(s); "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.  ",
        f"`retentive.ops.retention`, one row, {cfg['heads']} heads, dk={cfg['dk']}, dv={cfg['dv']}, float32, both "
        "normalizations on; forward + backward of a random linear loss. Time: median of "
        f"up to {cfg['repeats']} runs after a first one (fewer where a run is long); a cell is skipped where its "
        "extrapolated memory exceeds `--max-gib` or two runs exceed `--max-seconds`. Peak: extra resident memory "
        "of one forward+backward "
        "(inputs excluded), "
        "`VmHWM` after a reset minus `VmRSS` before, in a worker process whose glibc mmap threshold is fixed "
        "at 64 KiB so that freed tensors leave the resident set (see the docstring of `benchmarks/forms.py`).",
        "",
        benchkit.markdown_table(
            ["T", *(f"{name} {what}" for _, name in forms for what in ("ms", "peak MiB"))],
            [[f"{T:,}", *(c for form, _ in forms for c in cell(results[form][str(T)]))] for T in cfg["lengths"]],
            align=":",
        ),
        "",
        f"Recurrent decode step (T=1, after a chunkwise prefill to the position; median of {cfg['steps']} steps, "
        "positions interleaved):",
        "",
        benchkit.markdown_table(
            ["position", "ms / token", "state bytes"],
            [
                [f"{P:,}", f"{1e3 * decode[str(P)]['seconds']:.3f}", f"{decode[str(P)]['state_bytes']:,}"]
                for P in cfg["lengths"]
            ],
            align=":",
        ),
    ]
    lines += ["", "Claims:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    if args.quick:
        lines += ["", "(--quick: tiny sizes, a smoke run; the claims need the full sizes.)"]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the "Retention forms" section of ``path`` (or append it), leaving other sections alone."""
    benchkit.write_section(path, SECTION, section)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--out", type=Path, default=benchkit.DOCS / "benchmarks.md", help="markdown file to update")
    benchkit.add_sweep_arguments(parser, max_seconds=120.0, max_seconds_help="time budget of one (form, T) cell")
    args = parser.parse_args(argv)
    if args.worker:
        benchkit.answer_worker(worker, args.worker)
        return
    benchkit.require_proc("forms.py")
    args.command = (
        "python benchmarks/forms.py"
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads != 1 else "")
    )
    cfg = QUICK if args.quick else FULL
    host = benchkit.machine()
    job = {"cfg": cfg, "threads": args.threads, "max_gib": args.max_gib, "max_seconds": args.max_seconds}
    results = benchkit.run_worker(Path(__file__), job, env=benchkit.TRACKED_MEMORY_ENV, progress=True)
    decode = results.pop("decode")
    checks = claims(results, decode, cfg["lengths"])
    section = markdown(args, cfg, results, decode, checks, host)
    write_section(args.out, section)
    print(section)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
