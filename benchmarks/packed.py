"""A training step on documents packed into a row, against the same documents padded to the longest, and against
the row read as one document: what retention's ``starts`` costs, side by side.

    python benchmarks/packed.py          # a 2,048-token row; writes "Packed documents" in docs/benchmarks.md
    python benchmarks/packed.py --quick  # tiny sizes (what the test runs)

What is measured: the median wall time of forward + backward of ``RetNetForCausalLM`` (random weights, float32, the
chunkwise form) on one row of T tokens, three ways, taken in turn:

- packed: the row with ``position_ids`` restarting at 0 at each document (transformers' ``DataCollatorWithFlattening``),
  each document read on its own through retention's ``starts``;
- padded: one row per document, right-padded to the longest, labels -100 on the padding: what a model without
  ``starts`` must run to keep the documents apart;
- one document: the row as it is, no starts: the floor, what no document boundary costs.

Two layouts of documents: uneven (one of T/2 tokens and many short ones, as a corpus of web pages packs) and even.
It checks one claim and prints PASS or FAIL: packed within 1.2x of one document in every layout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from retentive import RetNetConfig, RetNetForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit

SECTION = "## Packed documents"
FULL = {"tokens": 2048, "dim_model": 256, "num_layers": 4, "num_heads": 4, "vocab": 4096, "repeats": 5}
QUICK = {"tokens": 64, "dim_model": 32, "num_layers": 2, "num_heads": 2, "vocab": 128, "repeats": 1}
CLAIM = 1.2  # packed / one document


def layouts(T: int) -> dict[str, list[int]]:
    """Document lengths summing to T: uneven (T/2, then T/64-token documents) and even (16 of T/16)."""
    return {"uneven": [T // 2] + [T // 64] * 32, "even": [T // 16] * 16}


def batches(lengths: list[int], vocab: int) -> dict[str, dict[str, torch.Tensor]]:
    """The three ways to feed the same documents, as keyword arguments of the model."""
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(vocab, (n,), generator=gen) for n in lengths]
    row = torch.cat(docs)[None]  # (1, T)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    longest = max(lengths)
    rows = torch.zeros(len(docs), longest, dtype=torch.long)
    mask = torch.zeros(len(docs), longest, dtype=torch.long)
    for i, doc in enumerate(docs):
        rows[i, : len(doc)], mask[i, : len(doc)] = doc, 1
    return {
        "packed": {"input_ids": row, "position_ids": positions, "labels": row},
        "padded": {"input_ids": rows, "attention_mask": mask, "labels": rows.masked_fill(mask == 0, -100)},
        "one document": {"input_ids": row, "labels": row},
    }


def step(model: RetNetForCausalLM, batch: dict[str, torch.Tensor]) -> float:
    """Seconds of one forward + backward."""
    start = time.perf_counter()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(cfg: dict) -> dict[str, dict[str, float]]:
    """Median seconds per layout and way, the ways taken in turn so that drift spreads over all three."""
    config = RetNetConfig(
        vocab_size=cfg["vocab"],
        dim_model=cfg["dim_model"],
        num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"],
        ffn_dim=2 * cfg["dim_model"],
        mode="chunkwise",
    )
    model = RetNetForCausalLM(config).train()
    results = {}
    for name, lengths in layouts(cfg["tokens"]).items():
        ways = batches(lengths, cfg["vocab"])
        times = {way: [] for way in ways}
        for batch in ways.values():  # warm-up
            step(model, batch)
        for _ in range(cfg["repeats"]):
            for way, batch in ways.items():
                times[way].append(step(model, batch))
        results[name] = {way: statistics.median(t) for way, t in times.items()}
        results[name]["tokens run"] = ways["padded"]["input_ids"].numel()
    return results


def markdown(command: str, cfg: dict, results: dict, host: str) -> tuple[str, list[tuple[str, bool]]]:
    header = ["documents (lengths)", "one document ms", "packed ms", "padded ms", "packed / one", "padded / packed"]
    rows, checks = [], []
    for name, lengths in layouts(cfg["tokens"]).items():
        r = results[name]
        first, *rest = lengths
        shown = f"{first}, {len(rest)} x {rest[0]}" if first != rest[0] else f"{len(lengths)} x {first}"
        ratio = r["packed"] / r["one document"]
        checks.append((f"{name}: packed within {CLAIM}x of one document ({ratio:.2f}x)", ratio <= CLAIM))
        rows.append(
            [
                f"{name} ({shown})",
                f"{1e3 * r['one document']:.1f}",
                f"{1e3 * r['packed']:.1f}",
                f"{1e3 * r['padded']:.1f} ({r['tokens run']:,} tokens)",
                f"{ratio:.2f}",
                f"{r['padded'] / r['packed']:.1f}",
            ]
        )
    d, L, H = cfg["dim_model"], cfg["num_layers"], cfg["num_heads"]
    lines = [
        SECTION,
        "",
        f"Forward + backward of `RetNetForCausalLM` (d {d}, {L} layers, {H} heads, vocab {cfg['vocab']}, float32, "
        f"chunkwise form) on one row of {cfg['tokens']:,} tokens, median of {cfg['repeats']} (taken in turn). "
        "Packed: `position_ids` restarting at each document (retention's `starts`); padded: one row per document, "
        "right-padded to the longest; one document: the same row without boundaries (the floor).",
        "",
        benchkit.markdown_table(header, rows),
        "",
        *(f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks),
        "",
        f"Machine: {host}; torch threads {torch.get_num_threads()}. Command: `{command}`.",
        "",
    ]
    return "\n".join(lines), checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--out", type=Path, default=benchkit.DOCS / "benchmarks.md", help="markdown file to update")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python benchmarks/packed.py" + " --quick" * args.quick
    command += f" --threads {args.threads}" if args.threads != 1 else ""
    cfg = QUICK if args.quick else FULL
    host = benchkit.machine()
    section, _ = markdown(command, cfg, measure(cfg), host)
    benchkit.write_section(args.out, SECTION, section)
    print(section)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
