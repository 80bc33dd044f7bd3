"""Quality side by side: RetNet and its Transformer twin, same trainer, same recipe, same tokens.

For each corpus (Shakespeare; the King James Bible from Debian's ``bible-kjv``) a byte-level BPE is trained,
then for each seed both models are trained by :class:`retentive.training.Trainer` on the same batches
(the sampler's seed is the run's seed) and evaluated on the held-out tokens at the training length T, 2T
and 4T. Results: ``<out>/bench_quality.json``, a table in ``<out>/benchmarks.md``, ``bench_quality.png``.

    python benchmarks/quality.py              # the full run (~25 min on 2 quiet cores)
    python benchmarks/quality.py --quick      # tiny, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402
from retentive.baselines import count_parameters, model_from_preset  # noqa: E402
from retentive.data import EvalWindows, TokenWindows, build_tokenizer, read_corpus, tokenize_corpus  # noqa: E402
from retentive.training import TrainConfig, Trainer, seed_everything  # noqa: E402

log = logging.getLogger("bench.quality")
START, END = "<!-- bench:quality:start -->", "<!-- bench:quality:end -->"
MODELS = {"RetNet": "retnet-tiny", "Transformer": "transformer-tiny"}
FULL = {
    "corpora": ["shakespeare", "kjv"],
    "seeds": [0, 1, 2],
    "model": {"dim_model": 128, "num_layers": 4, "num_heads": 4, "ffn_dim": 256},
    "tokenizer": "bpe",
    "vocab_size": 2048,
    "seq_len": 128,
    "batch_size": 16,
    "steps": 400,
    "warmup": 40,
    "lr": 2e-3,
    "eval_lengths": [1, 2, 4],
    "eval_batches": 24,
    "max_chars": None,
}
QUICK = FULL | {
    "seeds": [0],
    "model": {"dim_model": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64},
    "tokenizer": "bytes",
    "seq_len": 16,
    "batch_size": 4,
    "steps": 3,
    "warmup": 1,
    "eval_batches": 2,
    "max_chars": 40_000,
}


def kjv_documents(cache: Path) -> list[str]:
    """The King James Bible, one document per book, from Debian's ``bible-kjv`` (its ``bible`` command).

    ``bible`` prints ``Ge1:1 In the beginning ...``; the references are dropped, one verse per line.
    """
    path = cache / "kjv.txt"
    if not path.is_file():
        if shutil.which("bible") is None:
            raise FileNotFoundError("the KJV corpus needs Debian's bible-kjv: `apt-get install bible-kjv`")
        text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    books: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        verse = re.match(r"^(\S+?)\d+:\d+ (.*)$", line)
        if verse:
            books.setdefault(verse[1], []).append(verse[2])
    return ["\n".join(verses) + "\n" for verses in books.values()]


def load_corpus(name: str, cache: Path, max_chars: int | None) -> list[str]:
    """The documents of corpus ``name`` (``"kjv"`` or anything :func:`read_corpus` reads), cut to ``max_chars``."""
    docs = kjv_documents(cache) if name == "kjv" else read_corpus(name)
    if max_chars is not None:  # the quick mode: a slice of every document
        docs = [d[: max(1, max_chars // len(docs))] for d in docs]
    return docs


def train_and_evaluate(preset: str, splits, vocab_size: int, seed: int, plan: dict) -> dict:
    """Train one model and return its validation perplexity at each evaluation length."""
    seed_everything(seed)
    model = model_from_preset(preset, vocab_size=vocab_size, **plan["model"])
    config = TrainConfig(
        steps=plan["steps"],
        lr=plan["lr"],
        warmup=plan["warmup"],
        eval_interval=0,
        ckpt_interval=0,
        log_interval=max(1, plan["steps"] // 10),
        device="cpu",
        progress=False,
    )
    T, B = plan["seq_len"], plan["batch_size"]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, TokenWindows(splits.train, T, B, seed), config, run_dir)
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        ppl = {}
        for factor in plan["eval_lengths"]:
            trainer.val_data = EvalWindows(splits.val, factor * T, max(1, B // factor), plan["eval_batches"])
            ppl[str(factor)] = trainer.evaluate()["val_ppl"]
    return {
        "val_ppl": ppl,
        "final_train_loss": result.losses[-1],
        "train_seconds": seconds,
        "parameters": count_parameters(model),
    }


def run_all(plan: dict, cache: Path) -> dict:
    """Every (corpus, seed, model) run of ``plan``."""
    results: dict = {"plan": plan, "corpora": {}}
    for corpus in plan["corpora"]:
        docs = load_corpus(corpus, cache, plan["max_chars"])
        tokenizer = build_tokenizer(plan["tokenizer"], docs, plan["vocab_size"])
        splits = tokenize_corpus(docs, tokenizer, cache / "tokens")
        entry = {
            "train_tokens": len(splits.train),
            "val_tokens": len(splits.val),
            "vocab_size": tokenizer.vocab_size,
            "runs": {m: {} for m in MODELS},
        }
        for seed in plan["seeds"]:
            for label, preset in MODELS.items():
                run = train_and_evaluate(preset, splits, tokenizer.vocab_size, seed, plan)
                entry["runs"][label][str(seed)] = run
                log.info(
                    "%-12s %-11s seed %d: val ppl %s (%.0f s)",
                    corpus,
                    label,
                    seed,
                    run["val_ppl"],
                    run["train_seconds"],
                )
        results["corpora"][corpus] = entry
    return results


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def quality_markdown(results: dict, plot: str) -> str:
    """The table (mean ± sd over seeds) and the gap RetNet - Transformer, per corpus and evaluation length."""
    plan, meta = results["plan"], results["meta"]
    m = plan["model"]
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), float32, "
        f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}. "
        f"Command: `{meta['command'].strip()}`.",
        f"Both models: {m['num_layers']} layers, d={m['dim_model']}, {m['num_heads']} heads, tied embeddings, "
        f"tokenizer: {plan['tokenizer']} (a BPE is trained on each corpus); the Transformer is the Llama twin "
        "of the RetNet (`transformer-tiny` with the same overrides; parameters matched within 2%). Same "
        f"trainer and recipe: AdamW (0.9, 0.98), weight decay 0.05, lr {plan['lr']} with {plan['warmup']} warm-up "
        f"steps and a cosine, {plan['steps']} steps of {plan['batch_size']} x {plan['seq_len']} tokens "
        f"({plan['steps'] * plan['batch_size'] * plan['seq_len']:,} tokens), the same batches for both (seeded). "
        f"Validation perplexity over seeds {plan['seeds']} (mean ± sd) at the training length T={plan['seq_len']} "
        "and at 2T and 4T (no fine-tuning at the longer lengths).",
        "",
    ]
    header = ["corpus", "length", "RetNet ppl", "Transformer ppl", "gap RetNet - Transformer"]
    rows = []
    for corpus, entry in results["corpora"].items():
        for factor in map(str, plan["eval_lengths"]):
            r = [run["val_ppl"][factor] for run in entry["runs"]["RetNet"].values()]
            t = [run["val_ppl"][factor] for run in entry["runs"]["Transformer"].values()]
            gaps = [a - b for a, b in zip(r, t, strict=True)]
            length = f"{int(factor) * plan['seq_len']} ({factor}T)"
            rows.append(
                [f"{corpus} ({entry['train_tokens']:,} train tokens)", length, _mean_sd(r), _mean_sd(t), _mean_sd(gaps)]
            )
    lines += [report._table(header, rows), "", f"![quality]({plot})", ""]
    return "\n".join(lines)


def plot_quality(results: dict, path: Path) -> None:
    """Perplexity against evaluation length, per corpus, with the spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = results["plan"]
    corpora = list(results["corpora"])
    fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 3.8), squeeze=False)
    lengths = [f * plan["seq_len"] for f in plan["eval_lengths"]]
    for ax, corpus in zip(axes[0], corpora, strict=True):
        for label, runs in results["corpora"][corpus]["runs"].items():
            per_len = [[run["val_ppl"][str(f)] for run in runs.values()] for f in plan["eval_lengths"]]
            means = [statistics.mean(v) for v in per_len]
            sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_len]
            ax.errorbar(lengths, means, yerr=sds, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("validation perplexity")
        ax.set_title(corpus)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, a slice of each corpus, 3 steps")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "retentive" / "bench")
    parser.add_argument("--corpora", nargs="+", help="override: shakespeare, kjv, or a text file / folder")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--steps", type=int, help="override the optimizer steps per run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = dict(QUICK if args.quick else FULL)
    for key in ("corpora", "seeds", "steps"):
        if getattr(args, key):
            plan[key] = getattr(args, key)
    started = time.time()
    results = run_all(plan, args.cache)
    results["meta"] = report.environment(started, quick=args.quick, argv=sys.argv[1:])
    results["meta"]["command"] = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "bench_quick_" if args.quick else "bench_"
    (args.out / f"{prefix}quality.json").write_text(json.dumps(results, indent=1))
    plot_quality(results, args.out / f"{prefix}quality.png")
    body = quality_markdown(results, f"{prefix}quality.png")
    if args.quick:
        (args.out / "bench_quick_quality.md").write_text(body)
    else:
        report.splice(args.out / "benchmarks.md", START, END, body, "Quality: RetNet and the Transformer, same recipe")
    log.info("done in %.0f s", time.time() - started)


if __name__ == "__main__":
    main()
