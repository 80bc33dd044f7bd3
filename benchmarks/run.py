"""Speed benchmarks side by side: decode, prefill and training for RetNet, the Transformer and the peers.

Each configuration runs in a fresh process (``measure.py``), so its peak RSS is its own; ``--quick`` runs
tiny sizes in this process (for CI). Results go to ``<out>/bench_results.json``; ``report.py``
turns them into the tables, checks and plots of docs/benchmarks.md.

    python benchmarks/run.py            # the full CPU run
    python benchmarks/run.py --quick    # tiny sizes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import measure  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
from benchkit import DOCS, TRACKED_MEMORY_ENV, environment, run_worker  # noqa: E402

log = logging.getLogger("bench")

FULL = {
    "dims": asdict(peers.Dims()),
    "contexts": [512, 1024, 2048, 4096, 8192, 16384],
    "decode_batch": 8,
    "decode_steps": 32,
    "prefill_tokens": 8192,
    "train_tokens": [512, 1024, 2048, 4096, 8192, 16384],
    "parallel_max_tokens": 4096,  # the parallel form holds (H, T, T) per layer: 16k would need ~40 GiB
    "chunk_size": 128,
    "peer_chunk_size": 512,
    "matmul_n": 2048,
    "rounds": 2,  # each timed cell runs in this many processes, interleaved across models; the best counts
    "timeout_s": 600,
}
QUICK = {
    "dims": {"num_layers": 2, "dim_model": 64, "num_heads": 2, "vocab_size": 256},
    "contexts": [32, 64],
    "decode_batch": 2,
    "decode_steps": 2,
    "prefill_tokens": 64,
    "train_tokens": [32, 64],
    "parallel_max_tokens": 64,
    "chunk_size": 16,
    "peer_chunk_size": 16,
    "matmul_n": 128,
    "rounds": 1,
    "timeout_s": 60,
}
# (label in the tables, adapter name, retentive's constructor arguments)
TRAINERS = [
    ("retentive chunkwise", "retentive", {"mode": "chunkwise"}),
    ("retentive chunkwise, logits + F.cross_entropy", "retentive", {"mode": "chunkwise", "loss": "logits"}),
    ("retentive parallel", "retentive", {"mode": "parallel"}),
    ("transformer (SDPA)", "transformer", {}),
    ("torchscale chunkwise", "torchscale", {}),
    ("yet-another-retnet chunkwise", "yet-another-retnet", {}),
]


def run_one(spec: dict, fresh_process: bool, timeout: float) -> dict:
    """One measurement, in a fresh process or here; failures come back as ``{"error": ...}``.

    ``train_memory`` runs with glibc's mmap threshold fixed at 64 KiB, so that freed tensors leave the resident set.
    """
    t0 = time.perf_counter()
    env = TRACKED_MEMORY_ENV if spec["task"] == "train_memory" else {}
    try:
        result = run_worker(HERE / "measure.py", spec, timeout=timeout, env=env) if fresh_process else measure.run(spec)
    except Exception as err:  # a failing configuration is reported in the tables, not fatal
        result = {"error": f"{type(err).__name__}: {err}"}
    log.info(
        "%-8s %-22s %s  (%.1f s)", spec["task"], spec.get("model", ""), _brief(spec, result), time.perf_counter() - t0
    )
    return result


def _brief(spec: dict, result: dict) -> str:
    where = spec.get("context") or spec.get("tokens") or ""
    if "error" in result:
        return f"{where}: {result['error']}"
    if spec["task"] == "decode":
        return f"{where}: {result['b1']['ms_per_token']:.3f} ms/token"
    if spec["task"] == "matmul":
        return f"{result['gflops']:.1f} GFLOP/s"
    if spec["task"] == "train_memory":
        return f"{where}: step peak {result['step_peak_bytes'] / 2**20:.0f} MiB"
    return f"{where}: {result['tokens_per_s']:.0f} tokens/s"


def run_all(plan: dict, models: list[str], fresh_process: bool) -> dict:
    """Every measurement of ``plan`` for ``models`` (a model missing here is recorded with the reason)."""
    base = {"dims": plan["dims"]} | ({"threads": plan["threads"]} if plan.get("threads") else {})

    def one(spec: dict) -> dict:
        return run_one(base | spec, fresh_process, plan["timeout_s"])

    missing = {m: peers.available(m) for m in models if peers.available(m)}
    present = [m for m in models if m not in missing]
    results: dict = {"plan": plan, "missing": missing, "decode": {}, "prefill": {}, "train": {}}
    matmul = one({"task": "matmul", "n": plan["matmul_n"]})
    decode = {"task": "decode", "batch": plan["decode_batch"], "steps": plan["decode_steps"]}
    cells = {(m, str(c)): decode | {"model": m, "context": c} for m in present for c in plan["contexts"]}
    fastest = best_of_rounds(cells, plan["rounds"], one, lambda a, b: a["b1"]["ms_per_token"] < b["b1"]["ms_per_token"])
    results["decode"] = {m: {str(c): fastest[m, str(c)] for c in plan["contexts"]} for m in present}
    cells = {m: {"task": "prefill", "model": m, "tokens": plan["prefill_tokens"]} for m in present}
    results["prefill"] = best_of_rounds(cells, plan["rounds"], one, _more_tokens_per_s)
    results["train"] = train_all(plan, present, one)
    # the peak again at the end, the best of both: a busy moment must not lower the reference
    results["matmul"] = max((matmul, one({"task": "matmul", "n": plan["matmul_n"]})), key=lambda r: r.get("gflops", 0))
    return results


def best_of_rounds(cells: dict, rounds: int, one: Callable[[dict], dict], better: Callable[[dict, dict], bool]) -> dict:
    """{key: the best of ``rounds`` results of ``one(spec)``} for ``cells`` {key: spec}, ``better(a, b)`` ordering them.

    Timings go round-robin: each round visits every cell once, so that a slow spell on a shared machine lands on
    all models alike instead of on whichever row was running; the best round counts, as timeit reports (noise only
    ever adds time). A cell that fails is not tried again.
    """
    best: dict = {}
    for _ in range(rounds):
        for key, spec in cells.items():
            if "error" in best.get(key, {}):
                continue
            result = one(spec)
            if key not in best or ("error" not in result and better(result, best[key])):
                best[key] = result
    return best


def _more_tokens_per_s(a: dict, b: dict) -> bool:
    return a["tokens_per_s"] > b["tokens_per_s"]


def train_all(plan: dict, present: list[str], one: Callable[[dict], dict]) -> dict:
    """Training tokens/s (:func:`best_of_rounds`) and step memory for every trainer at every length.

    Memory is measured once per cell (it does not depend on the machine's load).
    """
    cells = {}  # (label, tokens) -> spec
    for tokens in plan["train_tokens"]:
        for label, model, kwargs in TRAINERS:
            if model not in present:
                continue
            spec = {"task": "train", "model": model, "tokens": tokens, "repeats": 3}
            if model == "retentive":
                spec |= kwargs | {"chunk_size": plan["chunk_size"]}
            elif model != "transformer":
                spec["chunk_size"] = plan["peer_chunk_size"]
            cells[label, tokens] = spec
    too_long = {
        key
        for key, spec in cells.items()
        if spec.get("mode") == "parallel" and spec["tokens"] > plan["parallel_max_tokens"]
    }
    timed = {key: spec for key, spec in cells.items() if key not in too_long}
    best = best_of_rounds(timed, plan["rounds"], one, _more_tokens_per_s)
    best |= {key: {"error": "skipped: the parallel form's (H, T, T) matrices do not fit"} for key in too_long}
    for key, cell in best.items():
        if "error" not in cell:
            memory = one(cells[key] | {"task": "train_memory"})
            cell |= memory if "error" not in memory else {"memory_error": memory["error"]}
    return {
        label: {str(t): best[label, t] for t in plan["train_tokens"]}
        for label, model, _ in TRAINERS
        if model in present
    }


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, in this process (for CI)")
    parser.add_argument("--out", type=Path, default=DOCS, help="where results, tables and plots go")
    parser.add_argument("--models", nargs="+", default=list(peers.ADAPTERS), choices=list(peers.ADAPTERS))
    parser.add_argument("--contexts", type=int, nargs="+", help="override the decode contexts")
    parser.add_argument("--train-tokens", type=int, nargs="+", help="override the training lengths")
    parser.add_argument("--chunk-size", type=int, help="retentive's chunk size (prefill and training)")
    parser.add_argument("--rounds", type=_positive, help="timings per cell, in rounds interleaved across models")
    parser.add_argument(
        "--threads", type=int, help="torch threads per measurement (default all cores; 1 on a busy machine)"
    )
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only, leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = dict(QUICK if args.quick else FULL)
    overrides = {
        "contexts": args.contexts,
        "train_tokens": args.train_tokens,
        "chunk_size": args.chunk_size,
        "rounds": args.rounds,
        "threads": args.threads,
    }
    plan |= {key: value for key, value in overrides.items() if value}
    started = time.time()
    results = run_all(plan, args.models, fresh_process=not args.quick)
    results["meta"] = environment("run.py", started, quick=args.quick, argv=sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_results_quick.json" if args.quick else "bench_results.json"
    (args.out / name).write_text(json.dumps(results, indent=1))
    if not args.no_docs:
        report.write_speed(results, args.out, prefix="bench_quick_" if args.quick else "bench_")
    log.info("done in %.0f s; results in %s", time.time() - started, args.out / name)


if __name__ == "__main__":
    main()
