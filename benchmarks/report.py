"""Tables, PASS/FAIL checks against the targets, and plots, from the results of ``run.py``."""

from __future__ import annotations

from pathlib import Path

from benchkit import MiB, markdown_table, save_figure, subplots, write_section


def _ok(cell: dict | None) -> bool:
    return isinstance(cell, dict) and "error" not in cell


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def _grid(corner: str, keys: list[str], columns: dict[str, dict], get, digits: int) -> str:
    """A table with one row per key and one column per entry of ``columns`` (each a dict keyed like ``keys``)."""
    return markdown_table(
        [corner, *columns], [[k] + [_cell(col.get(k), get, digits) for col in columns.values()] for k in keys]
    )


def _cell(cell: dict | None, get, digits: int = 2) -> str:
    if cell is None:
        return "n/a"
    if not _ok(cell):
        return "error" if not cell["error"].startswith("skipped") else "skipped"
    try:
        return _fmt(get(cell), digits)
    except KeyError:  # this part of the measurement failed (e.g. memory_error)
        return "n/a"


def train_flops_per_token(dims: dict, chunk_size: int) -> float:
    """Forward+backward FLOPs per token of retentive's chunkwise training, as its dense matmuls execute them.

    6 per weight (the projections, FFN and head; not the embedding lookup) plus, per layer and head, the
    intra-chunk QKᵀ and (QKᵀ)V over the whole chunk and the cross-chunk qS and kᵀv: 3 x forward.
    """
    d, L, H, V = dims["dim_model"], dims["num_layers"], dims["num_heads"], dims["vocab_size"]
    weights = L * 12 * d * d + d * V  # value_factor 2, FFN 2d; output head
    retention_fwd = L * (2 * chunk_size * d + 2 * chunk_size * 2 * d + 2 * 2 * d * (2 * d // H))
    return 6 * weights + 3 * retention_fwd


def checks(results: dict) -> list[tuple[str, bool | None, str]]:
    """The targets: (claim, PASS/FAIL or None when unmeasured, the numbers behind it)."""
    dec, plan = results["decode"], results["plan"]
    lo, hi = str(plan["contexts"][0]), str(plan["contexts"][-1])
    out: list[tuple[str, bool | None, str]] = []

    def ms(model: str, ctx: str) -> float | None:
        cell = dec.get(model, {}).get(ctx)
        return cell["b1"]["ms_per_token"] if _ok(cell) else None

    r_lo, r_hi, t_hi = ms("retentive", lo), ms("retentive", hi), ms("transformer", hi)
    if r_lo and r_hi:
        out.append(
            (
                f"decode latency at {hi} within 1.15x of {lo}",
                r_hi <= 1.15 * r_lo,
                f"{r_hi:.3f} / {r_lo:.3f} ms = {r_hi / r_lo:.2f}x",
            )
        )
    if (
        _ok(dec.get("retentive", {}).get(lo))
        and _ok(dec.get("retentive", {}).get(hi))
        and _ok(dec.get("transformer", {}).get(hi))
    ):
        c_lo, c_hi = dec["retentive"][lo]["b1"]["cache_bytes"], dec["retentive"][hi]["b1"]["cache_bytes"]
        kv = dec["transformer"][hi]["b1"]["cache_bytes"]
        out.append(
            (
                f"cache constant and >= 50x smaller than the KV cache at {hi}",
                c_lo == c_hi and kv >= 50 * c_hi,
                f"{c_hi:,} B (at {lo}: {c_lo:,} B) vs KV {kv:,} B = {kv / c_hi:.0f}x",
            )
        )
    if r_hi and t_hi:
        out.append(
            (
                f">= 8x faster decode than the Transformer at {hi}",
                t_hi >= 8 * r_hi,
                f"{t_hi:.3f} / {r_hi:.3f} ms = {t_hi / r_hi:.1f}x",
            )
        )
    for peer in ("torchscale", "yet-another-retnet"):
        if peer in results["missing"]:
            out.append((f"faster per-token decode than {peer} at every context", None, results["missing"][peer]))
            continue
        pairs = [(c, ms("retentive", c), ms(peer, c)) for c in map(str, plan["contexts"])]
        pairs = [(c, a, b) for c, a, b in pairs if a and b]
        if pairs:
            worst = max(pairs, key=lambda p: p[1] / p[2])
            out.append(
                (
                    f"faster per-token decode than {peer} at every context",
                    all(a < b for _, a, b in pairs),
                    f"worst at {worst[0]}: {worst[1]:.3f} vs {worst[2]:.3f} ms",
                )
            )
    pre = results["prefill"]
    if _ok(pre.get("retentive")):
        ours = pre["retentive"]["seconds"]
        for peer in ("torchscale", "yet-another-retnet", "transformer"):
            if _ok(pre.get(peer)):
                claim = f"prefill {plan['prefill_tokens']} faster than {peer}"
                out.append((claim, ours < pre[peer]["seconds"], f"{ours:.2f} s vs {pre[peer]['seconds']:.2f} s"))
    tr, n = results["train"], "8192" if "8192" in map(str, plan["train_tokens"]) else str(plan["train_tokens"][-1])
    chunk = tr.get("retentive chunkwise", {}).get(n)
    peer_cells = [(k, v.get(n)) for k, v in tr.items() if ("torchscale" in k or "yet-another" in k) and _ok(v.get(n))]
    if _ok(chunk) and peer_cells:
        best_label, best = max(peer_cells, key=lambda kv: kv[1]["tokens_per_s"])
        ratio = chunk["tokens_per_s"] / best["tokens_per_s"]
        out.append(
            (
                f"chunkwise training at {n} >= 1.5x the fastest peer ({best_label})",
                ratio >= 1.5,
                f"{chunk['tokens_per_s']:,.0f} vs {best['tokens_per_s']:,.0f} tokens/s = {ratio:.2f}x",
            )
        )
    trans = tr.get("transformer (SDPA)", {}).get(n)
    if _ok(chunk) and _ok(trans) and "step_peak_bytes" in chunk and "step_peak_bytes" in trans:
        a, b = chunk["step_peak_bytes"], trans["step_peak_bytes"]
        out.append(
            (
                f"chunkwise training peak memory at {n} <= the Transformer's",
                a <= b,
                f"{a / MiB:,.0f} vs {b / MiB:,.0f} MiB (one forward+backward)",
            )
        )
    return out


def speed_markdown(results: dict, prefix: str) -> str:
    """The markdown section for the speed results: caption, tables, checks, plots."""
    meta, plan, dec = results["meta"], results["plan"], results["decode"]
    dims = plan["dims"]
    v = meta["versions"]
    threads = plan.get("threads") or meta["torch_threads"]
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores, {threads} torch threads), "
        f"float32, Python {meta['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"torchscale {v['torchscale']}, yet-another-retnet {v['yet-another-retnet']}.",
        f"Command: `{meta['command'].strip()}` (under the benchmark environment, `make bench`). "
        f"Every model: {dims['num_layers']} layers, d={dims['dim_model']}, {dims['num_heads']} heads, "
        f"vocabulary {dims['vocab_size']}, parameters matched within 0.1% (the Transformer's MLP width and the "
        "peers' FFN width are solved for it).",
        f"Every timed cell (decode, prefill, training) runs in {plan.get('rounds', 1)} round(s) that visit every "
        "model at every size in turn, a fresh process per cell and round (except in --quick mode); the best round "
        "counts, so that a slow spell of this shared machine falls on all models alike.",
        "",
    ]
    for name, reason in results["missing"].items():
        lines.append(f"- **{name}: not measured** ({reason}).")
    contexts = [str(c) for c in plan["contexts"]]
    batch = plan["decode_batch"]
    pre, tr = results["prefill"], results["train"]
    lengths = [str(t) for t in plan["train_tokens"]]
    lines += [
        "",
        "#### Decode: ms per token at batch 1 (lower is better)",
        "",
        _grid("context", contexts, dec, lambda x: x["b1"]["ms_per_token"], 3),
        "",
        f"#### Decode: tokens/s at batch {batch} (higher is better)",
        "",
        _grid("context", contexts, dec, lambda x: x[f"b{batch}"]["tokens_per_s"], 0),
        "",
        "#### Decode: cache MiB at batch 1",
        "",
        _grid("context", contexts, dec, lambda x: x["b1"]["cache_bytes"] / MiB, 3),
        "",
        "#### Decode: process peak RSS MiB at batch 1 (model, cache and the runtime)",
        "",
        _grid("context", contexts, dec, lambda x: x["b1"]["peak_rss_bytes"] / MiB, 0),
        "",
        f"#### Prefill: reading {plan['prefill_tokens']:,} tokens into the decode state, batch 1 "
        "(best of 2 after a first call)",
        "",
        _grid("", ["seconds"], {m: {"seconds": pre[m]} for m in pre}, lambda x: x["seconds"], 2),
        "",
        "#### Training: forward+backward tokens/s, one sequence, best of 3 steps after a warm-up (higher is better)",
        "",
        "The loss is each library's own where it has one: retentive's `model(ids, labels=ids)` in training mode "
        "(output layer and cross-entropy block by block, `ops.linear_cross_entropy`), Hugging Face's for the "
        "Transformer; the peers return logits, scored by `F.cross_entropy`. The row *logits + F.cross_entropy* "
        "is retentive measured the peers' way.",
        "",
        _grid("tokens", lengths, tr, lambda x: x["tokens_per_s"], 0),
        "",
        "#### Training: peak memory of one forward+backward, MiB (model, inputs and gradients excluded; "
        "VmHWM - VmRSS in a process with glibc's mmap threshold at 64 KiB, after a warm-up step of the same length)",
        "",
        _grid("tokens", lengths, tr, lambda x: x["step_peak_bytes"] / MiB, 0),
    ]
    mm = results["matmul"]
    if _ok(mm):
        flops = train_flops_per_token(dims, plan["chunk_size"])
        rows = []
        for t in lengths:
            cell = tr.get("retentive chunkwise", {}).get(t)
            if _ok(cell):
                achieved = cell["tokens_per_s"] * flops / 1e9
                rows.append([t, _fmt(achieved, 1), f"{100 * achieved / mm['gflops']:.0f}%"])
        lines += [
            "",
            f"#### Chunkwise training against this machine's matmul peak ({mm['n']}x{mm['n']} float32 matmul: "
            f"{mm['gflops']:.1f} GFLOP/s; {flops / 1e6:.1f} MFLOP per token, chunk {plan['chunk_size']})",
            "",
            markdown_table(["tokens", "GFLOP/s", "fraction of peak"], rows),
        ]
    lines += ["", "#### The targets", ""]
    for claim, ok, detail in checks(results):
        verdict = "UNMEASURED" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"- **{verdict}** {claim}: {detail}")
    lines += ["", f"![decode]({prefix}decode.png)", f"![training]({prefix}train.png)", ""]
    return "\n".join(lines)


def plot_speed(results: dict, out: Path, prefix: str) -> list[Path]:
    """bench_decode.png (latency, cache) and bench_train.png (tokens/s, memory)."""
    paths = []
    dec, plan = results["decode"], results["plan"]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    for model, row in dec.items():
        xs = [int(c) for c in row if _ok(row[c])]
        ax1.plot(xs, [row[str(c)]["b1"]["ms_per_token"] for c in xs], "o-", label=model)
        ax2.plot(xs, [row[str(c)]["b1"]["cache_bytes"] / MiB for c in xs], "o-", label=model)
    for ax, title in ((ax1, "decode latency, batch 1 (ms/token)"), (ax2, "decode cache (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend()
    paths.append(out / f"{prefix}decode.png")
    save_figure(fig, paths[-1])

    tr = results["train"]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    for label, row in tr.items():
        xs = [int(t) for t in row if _ok(row[t])]
        ax1.plot(xs, [row[str(t)]["tokens_per_s"] for t in xs], "o-", label=label)
        xm = [t for t in xs if "step_peak_bytes" in row[str(t)]]
        ax2.plot(xm, [row[str(t)]["step_peak_bytes"] / MiB for t in xm], "o-", label=label)
    for ax, title in ((ax1, "training fwd+bwd (tokens/s)"), (ax2, "training step peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"{plan['dims']['num_layers']} layers, d={plan['dims']['dim_model']}, float32, CPU", fontsize=9)
    paths.append(out / f"{prefix}train.png")
    save_figure(fig, paths[-1])
    return paths


def write_speed(results: dict, out: Path, prefix: str) -> None:
    """Plots to ``out``; the tables into ``out/benchmarks.md`` (or ``out/bench_quick.md`` in quick mode)."""
    plot_speed(results, out, prefix)
    body = speed_markdown(results, prefix)
    if results["meta"]["quick"]:
        (out / "bench_quick.md").write_text(body)
    else:
        heading = "## Speed and memory: RetNet, the Transformer and the peers"
        write_section(out / "benchmarks.md", heading, body, name="speed")
