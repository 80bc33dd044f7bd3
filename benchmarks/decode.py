"""One decoding step against what the hardware allows, beside the other RetNet libraries, in one run.

Every cell runs in a fresh process (``measure.py``), in ``rounds`` rounds interleaved across the models; the best
round counts. Measured: ms per token at batch 1 and tokens/s at larger batches through each model's public cached
step (retentive: ``lm(token, cache=cache, use_cache=True)``, eager, compiled, aot and native), retentive's
``generate()``, and the bound: one product over the step's weight bytes (plus, growing with the batch, one read
and write of the states), measured in the same run. The peer targets are judged on ratios taken step for step in
one process (``measure.paired``), which the machine's drift between cells leaves alone. Results go to
``docs/bench_decode.json`` and docs/benchmarks.md.

    python benchmarks/decode.py            # the full CPU run (about 15 minutes on 2 cores)
    python benchmarks/decode.py --quick    # tiny sizes (for CI)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
from benchkit import DOCS, WorkerFailed, environment, machine, markdown_table, run_worker, write_section  # noqa: E402

log = logging.getLogger("bench-decode")

# (label, spec): retentive eager (the reference), compiled (torch.compile), aot (AOTInductor) and native (the C++
# step), the peers' recurrent steps
MODELS = [
    ("retentive (eager)", {"model": "retentive", "decode_implementation": "eager"}),
    ("retentive (compiled)", {"model": "retentive", "decode_implementation": "compiled"}),
    ("retentive (aot)", {"model": "retentive", "decode_implementation": "aot"}),
    ("retentive (native)", {"model": "retentive", "decode_implementation": "native"}),
    ("yet-another-retnet", {"model": "yet-another-retnet"}),
    ("torchscale", {"model": "torchscale"}),
]
FULL = {
    "dims": asdict(peers.Dims()),
    "contexts": [512, 16384],
    "batches": [1, 8, 64],
    "steps": 32,
    "generate": {"prompt": 512, "new_tokens": 128},
    "prefill_tokens": 8192,
    "rounds": 3,
    "paired": {"cycles": 12, "steps": 16},
    "timeout_s": 600,
}
QUICK = {
    "dims": {"num_layers": 2, "dim_model": 32, "num_heads": 2, "vocab_size": 97},
    "contexts": [16],
    "batches": [1, 2],
    "steps": 2,
    "generate": {"prompt": 8, "new_tokens": 16, "repeats": 3},
    "prefill_tokens": 32,
    "rounds": 1,
    "paired": {"cycles": 2, "steps": 2},
    "timeout_s": 300,
}
TARGETS = {"bound_b1": 1.5, "peers_b1": 2.5, "peers_b8": 2.0, "flat": 1.15}
JUDGED = "native"  # the step the targets judge: the CPU's fastest (docs/benchmarks.md, "Decode step")
IMPLEMENTATIONS = ("eager", "compiled", "aot", "native")


def measure(spec: dict, timeout: float) -> dict:
    try:
        return run_worker(HERE / "measure.py", spec, timeout=timeout)
    except WorkerFailed as err:
        return {"error": str(err)}


def run_all(plan: dict, labels: list[str]) -> dict:
    """Every cell of ``plan`` for the models ``labels``; a missing peer is recorded with the reason."""
    base = {"dims": plan["dims"], "batches": plan["batches"], "steps": plan["steps"]}
    models = [(label, spec) for label, spec in MODELS if label in labels]
    missing = {label: peers.available(spec["model"]) for label, spec in models if peers.available(spec["model"])}
    models = [(label, spec) for label, spec in models if label not in missing]
    bound = [measure({"task": "weight_bound", **base}, plan["timeout_s"])]
    decode: dict[str, dict[str, dict]] = {label: {} for label, _ in models}
    for _ in range(plan["rounds"]):  # interleaved: a noisy moment hits every model once, not one model always
        for context in plan["contexts"]:
            for label, spec in models:
                cell = measure({"task": "decode", "context": context, **base, **spec}, plan["timeout_s"])
                log.info("%s at %d: %s", label, context, _brief(cell))
                decode[label][str(context)] = faster(decode[label].get(str(context)), cell)
    # the peer targets' ratios, taken step for step in one process (see measure.paired): the judged step first
    judged = [spec for label, spec in models if label == f"retentive ({JUDGED})"]
    rivals = [(label, spec) for label, spec in models if not label.startswith("retentive")]
    paired = {}
    if judged and rivals:
        targets = [b for b in (1, 8) if b in plan["batches"]]
        specs, names = judged + [spec for _, spec in rivals], [label for label, _ in rivals]
        for context in plan["contexts"]:
            job = {"task": "paired", "dims": plan["dims"], "context": context, "batches": targets, "models": specs}
            cell = measure(job | plan["paired"], plan["timeout_s"])
            if "error" not in cell:  # per batch: the judged step's entry, then one per rival in the order of names
                cell = {key: dict(zip(names, runs[1:], strict=True)) for key, runs in cell.items()}
            paired[str(context)] = cell
            log.info("paired at %d: %s", context, cell)
    flat = {}  # the judged step after the shortest and the longest context, step for step in one process
    if judged and len(plan["contexts"]) > 1:
        short, long = plan["contexts"][0], plan["contexts"][-1]
        pair = [judged[0], judged[0] | {"context": long}]
        job = {"task": "paired", "dims": plan["dims"], "context": short, "batches": [1], "models": pair}
        cell = measure(job | plan["paired"], plan["timeout_s"])
        flat = cell if "error" in cell else {"short": short, "long": long, **cell["b1"][1]}
        log.info("flat: %s", flat)
    generate = {}
    for implementation in IMPLEMENTATIONS:
        spec = {"task": "generate", "dims": plan["dims"], "decode_implementation": implementation, **plan["generate"]}
        generate[implementation] = measure(spec, plan["timeout_s"])
        log.info("generate() %s: %s", implementation, generate[implementation])
    prefill: dict[str, dict] = {}  # the first token's cost: the prompt read into the state (one per library)
    for _ in range(plan["rounds"]):
        for name in dict.fromkeys(spec["model"] for _, spec in models):
            spec = {"task": "prefill", "model": name, "dims": plan["dims"], "tokens": plan["prefill_tokens"]}
            cell = measure(spec, plan["timeout_s"])
            if name not in prefill or "error" in prefill[name] or cell.get("seconds", 1e9) < prefill[name]["seconds"]:
                prefill[name] = cell
    bound.append(measure({"task": "weight_bound", **base}, plan["timeout_s"]))  # the best of before and after
    return {
        "plan": plan,
        "missing": missing,
        "decode": decode,
        "generate": generate,
        "prefill": prefill,
        "paired": paired,
        "flat": flat,
        "bound": best_bound(bound),
    }


def faster(best: dict | None, cell: dict) -> dict:
    """The faster of two results of one cell, batch by batch (each batch size is timed on its own)."""
    if best is None or "error" in best:
        return cell
    if "error" in cell:
        return best
    merged = dict(best)
    for key, value in cell.items():
        if key.startswith("b") and value["ms_per_token"] < best[key]["ms_per_token"]:
            merged[key] = value
    return merged


def _brief(cell: dict) -> str:
    if "error" in cell:
        return cell["error"]
    return ", ".join(f"{k} {v['ms_per_token']:.3f} ms" for k, v in cell.items() if k.startswith("b"))


def best_bound(runs: list[dict]) -> dict:
    """Per batch, the smaller of each bound's timings: a busy moment must not make the bound easier to meet."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = {k: ok[0][k] for k in ("weight_bytes", "products", "fused_products")}
    for key in (k for k in ok[0] if k.startswith("b")):
        fields = ("weights_ms", "read_ms", "state_ms", "products_ms", "fused_products_ms")
        out[key] = {field: min(r[key][field] for r in ok) for field in fields}
        kernels = ok[0][key]["weights_by_kernel"]
        out[key]["weights_by_kernel"] = {k: min(r[key]["weights_by_kernel"][k] for r in ok) for k in kernels}
        out[key]["state_bytes"] = ok[0][key]["state_bytes"]
    return out


def checks(results: dict) -> list[tuple[str, bool | None, str]]:
    """The targets of the decoding step: (claim, PASS/FAIL or None when unmeasured, the numbers behind it)."""
    dec, bound, plan = results["decode"], results["bound"], results["plan"]
    out: list[tuple[str, bool | None, str]] = []
    contexts = [str(c) for c in plan["contexts"]]
    peer_labels = [label for label in dec if not label.startswith("retentive")]

    def ms(label: str, context: str, batch: int) -> float | None:
        cell = dec.get(label, {}).get(context, {})
        return cell.get(f"b{batch}", {}).get("ms_per_token")

    judged = f"retentive ({JUDGED})"
    if "error" not in bound:
        b1 = bound["b1"]["weights_ms"]
        worst = max(ms(judged, c, 1) or float("inf") for c in contexts)
        out.append(
            (
                f"{judged}: batch 1 within {TARGETS['bound_b1']}x of the weight-read bound",
                worst <= TARGETS["bound_b1"] * b1,
                f"{worst:.3f} ms vs {b1:.3f} ms = {worst / b1:.2f}x",
            )
        )
        gen = results["generate"].get(JUDGED, {})
        if "ms_per_token" in gen:
            g = gen["ms_per_token"]
            out.append(
                (
                    f"generate() ({JUDGED}) at batch 1 within {TARGETS['bound_b1']}x of the weight-read bound",
                    g <= TARGETS["bound_b1"] * b1,
                    f"{g:.3f} ms vs {b1:.3f} ms = {g / b1:.2f}x",
                )
            )
    paired = results.get("paired", {})
    for batch, key in ((1, "peers_b1"), (8, "peers_b8")):
        for peer in peer_labels:
            # (context, ratio, its range over cycles): step for step in one process where measured, else cells
            ratios = [
                (c, p["ratio"], f"{p['ratio_min']:.2f}-{p['ratio_max']:.2f}")
                for c in contexts
                if (p := paired.get(c, {}).get(f"b{batch}", {}).get(peer))
            ]
            how = f"paired, median of {plan.get('paired', {}).get('cycles')} cycles (range)"
            if not ratios:
                cells = [(c, ms(judged, c, batch), ms(peer, c, batch)) for c in contexts]
                ratios = [(c, b / a, f"{a:.3f} vs {b:.3f} ms") for c, a, b in cells if a and b]
                how = "fresh processes, best round"
            if ratios:
                worst = min(ratios, key=lambda r: r[1])
                out.append(
                    (
                        f"{judged}: batch {batch} at least {TARGETS[key]}x faster than {peer} at every context",
                        all(ratio >= TARGETS[key] for _, ratio, _ in ratios),
                        f"worst at {worst[0]}: {worst[1]:.2f}x ({how}: {worst[2]})",
                    )
                )
    prefill = {name: cell for name, cell in results.get("prefill", {}).items() if "error" not in cell}
    if "retentive" in prefill and len(prefill) > 1:
        others = {name: cell["tokens_per_s"] for name, cell in prefill.items() if name != "retentive"}
        best = max(others, key=others.get)
        ours = prefill["retentive"]["tokens_per_s"]
        out.append(
            (
                f"prefill of {plan['prefill_tokens']:,} tokens the fastest of all",
                ours > others[best],
                f"{ours:,.0f} tokens/s vs {best} {others[best]:,.0f}",
            )
        )
    flat = results.get("flat", {})
    for label in (label for label in dec if label.startswith("retentive")):  # every step keeps the promise
        lo, hi = ms(label, contexts[0], 1), ms(label, contexts[-1], 1)
        if label == judged and "ratio" in flat:  # step for step in one process, as the peer targets
            out.append(
                (
                    f"{label}: batch 1 flat from {flat['short']} to {flat['long']} tokens of context",
                    flat["ratio"] <= TARGETS["flat"],
                    f"{flat['ratio']:.2f}x (paired, median of {plan['paired']['cycles']} cycles (range): "
                    f"{flat['ratio_min']:.2f}-{flat['ratio_max']:.2f})",
                )
            )
        elif lo and hi and len(contexts) > 1:
            out.append(
                (
                    f"{label}: batch 1 flat from {contexts[0]} to {contexts[-1]} tokens of context",
                    hi <= TARGETS["flat"] * lo,
                    f"{hi:.3f} / {lo:.3f} ms = {hi / lo:.2f}x",
                )
            )
    return out


def markdown(results: dict) -> str:
    meta, plan, dec, bound = results["meta"], results["plan"], results["decode"], results["bound"]
    batches = plan["batches"]
    header = ["model", "context", *(f"b{b} ms/token" if b == 1 else f"b{b} tokens/s" for b in batches)]
    rows = []
    for label, cells in dec.items():
        for context, cell in cells.items():
            if "error" in cell:
                rows.append([label, context, *([cell["error"]] + [""] * (len(batches) - 1))])
                continue
            values = [
                f"{cell[f'b{b}']['ms_per_token']:.3f}" if b == 1 else f"{cell[f'b{b}']['tokens_per_s']:,.0f}"
                for b in batches
            ]
            rows.append([label, context, *values])
    if "error" not in bound:
        weights = [bound[f"b{b}"]["weights_ms"] for b in batches]
        both = [bound[f"b{b}"]["weights_ms"] + bound[f"b{b}"]["state_ms"] for b in batches]
        reads = [bound[f"b{b}"]["read_ms"] for b in batches]
        rows.append(["one read of the weights (a sum)", "any", *(f"{t:.3f}" for t in reads)])
        rows.append(["bound: the weights", "any", *(_bound_cell(b, t) for b, t in zip(batches, weights, strict=True))])
        rows.append(
            ["bound: weights + states", "any", *(_bound_cell(b, t) for b, t in zip(batches, both, strict=True))]
        )
        for field, label in (
            ("products_ms", f"floor: the step's {bound['products']} products, one call each"),
            ("fused_products_ms", f"floor: q, k, v, g in one product ({bound['fused_products']} calls)"),
        ):
            rows.append([label, "any", *(_bound_cell(b, bound[f"b{b}"][field]) for b in batches)])
    gen = results["generate"]
    compiling = "".join(_warm_up(implementation, dec, batches) for implementation in IMPLEMENTATIONS[1:])
    lines = [
        f"`{meta['command']}` ({meta['date']}; {meta['machine']}; torch {meta['versions']['torch']}, "
        f"{meta['torch_threads']} threads). Models of `make bench` ({plan['dims']}); a random state stands for "
        f"the context. Every cell in a fresh process, best of {plan['rounds']} interleaved round(s); median of "
        f"{plan['steps']} steps. Bound rows: one product of the batch with a matrix of the step's "
        f"{bound.get('weight_bytes', 0) / 1e6:.1f} MB of weights (batch 1: a matrix-vector product), the fastest "
        f"of the libraries at hand ({_kernels(bound, batches)}), and that plus one read and write of every layer's "
        "state; one read of the same bytes (a sum, in ms at every batch) is what no product beats. "
        "Floor rows: the step's own matrix products alone, one "
        "`F.linear` call each on the model's weights (what any step made of one library call per product "
        "cannot beat), and the same with each layer's q, k, v and g projections concatenated.",
        "",
        markdown_table(header, rows),
        "",
        "`generate()` (greedy, batch 1, prompt "
        f"{plan['generate']['prompt']}, {plan['generate']['new_tokens']} new tokens, the prefill subtracted): "
        + ", ".join(f"{k} {v['ms_per_token']:.3f} ms/token" for k, v in gen.items() if "ms_per_token" in v)
        + "."
        + compiling,
        "",
        *_paired_lines(results),
        "Prefill, batch 1, "
        f"{plan['prefill_tokens']:,} tokens (the first token's cost; best of {plan['rounds']} round(s)): "
        + ", ".join(
            f"{name} {cell['tokens_per_s']:,.0f} tokens/s"
            for name, cell in results["prefill"].items()
            if "error" not in cell
        )
        + ".",
        "",
        "| target | result | numbers |",
        "|---|---|---|",
        *(f"| {claim} | {_verdict(ok)} | {why} |" for claim, ok, why in checks(results)),
    ]
    return "\n".join(lines)


def _warm_up(implementation: str, dec: dict, batches: list[int]) -> str:
    """What compiling ``implementation`` cost: ``warm_up_decoding()`` in each cell's fresh process, and the first
    step at each batch size after it."""
    cells = [cell for cell in dec.get(f"retentive ({implementation})", {}).values() if "error" not in cell]
    warm = [cell["warm_up_s"] for cell in cells if "warm_up_s" in cell]
    first = [cell[f"b{b}"]["first_step_ms"] for cell in cells for b in batches]
    if not (warm and first):
        return ""
    return (
        f" {implementation}: `warm_up_decoding()` (batch 1 and 2) took {min(warm):.1f}-{max(warm):.1f} s; after "
        f"it, the first step at each batch size took at most {max(first):.1f} ms."
    )


def _paired_lines(results: dict) -> list[str]:
    """The paired measurement (measure.paired), a sentence per context, and an empty line after them."""
    cycles = results["plan"].get("paired", {}).get("cycles")
    lines = []
    for context, cell in results.get("paired", {}).items():
        if "error" in cell:
            lines.append(f"Paired at {context} tokens of context: {cell['error']}")
            continue
        parts = [
            f"batch {key[1:]}: {peer} {p['ms_per_token']:.3f} ms per step, {p['ratio']:.2f}x "
            f"({p['ratio_min']:.2f}-{p['ratio_max']:.2f})"
            for key, rivals in cell.items()
            for peer, p in rivals.items()
        ]
        lines.append(
            f"Paired at {context} tokens of context (retentive ({JUDGED}) and each peer step for step in one "
            f"process; each peer's step time over the judged step's, median of {cycles} cycles and their range): "
            + "; ".join(parts)
            + "."
        )
    flat = results.get("flat", {})
    if "ratio" in flat:
        lines.append(
            f"Paired after {flat['short']:,} and {flat['long']:,} tokens of context (retentive ({JUDGED}) with a cache "
            f"of each, step for step in one process): {flat['ms_per_token']:.3f} ms per step after {flat['long']:,}, "
            f"{flat['ratio']:.2f}x the step after {flat['short']:,} (median of {cycles} cycles; "
            f"{flat['ratio_min']:.2f}-{flat['ratio_max']:.2f})."
        )
    elif "error" in flat:
        lines.append(f"Paired after two contexts: {flat['error']}")
    return [*lines, ""] if lines else []


def _kernels(bound: dict, batches: list[int]) -> str:
    """Each product kernel's bound per batch, e.g. ``torch 0.48/1.20 ms, numpy 0.13/1.75 ms``."""
    if "error" in bound:
        return ""
    names = bound[f"b{batches[0]}"]["weights_by_kernel"]
    cells = (
        f"{name} " + "/".join(f"{bound[f'b{b}']['weights_by_kernel'][name]:.3f}" for b in batches) + " ms"
        for name in names
    )
    return f"at batch {'/'.join(map(str, batches))}: " + ", ".join(cells)


def _bound_cell(batch: int, ms: float) -> str:
    return f"{ms:.3f}" if batch == 1 else f"{batch / ms * 1e3:,.0f}"


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for CI)")
    parser.add_argument("--out", type=Path, default=DOCS, help="where the JSON and docs/benchmarks.md go")
    parser.add_argument("--models", nargs="+", default=[label for label, _ in MODELS], choices=[m for m, _ in MODELS])
    parser.add_argument("--contexts", type=int, nargs="+", help="override the contexts")
    parser.add_argument("--rounds", type=int, help="rounds per cell, interleaved across models")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = dict(QUICK if args.quick else FULL)
    plan |= {k: v for k, v in {"contexts": args.contexts, "rounds": args.rounds}.items() if v}
    started, host = time.time(), machine()  # the load average before the run
    results = run_all(plan, args.models)
    results["meta"] = environment("decode.py", started, quick=args.quick, argv=sys.argv[1:] if argv is None else argv)
    results["meta"]["machine"] = host
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_decode_quick.json" if args.quick else "bench_decode.json"
    (args.out / name).write_text(json.dumps(results, indent=1))
    text = markdown(results)
    if not args.no_docs and not args.quick:
        write_section(args.out / "benchmarks.md", "## Decode step against the weight-read bound", text, "decode")
    print(text)


if __name__ == "__main__":
    main()
