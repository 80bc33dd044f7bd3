"""Quality side by side: retentive's RetNet, the peers' RetNets and the Transformer twin, same trainer, same tokens.

For each corpus (Shakespeare; the King James Bible from Debian's ``bible-kjv``) a byte-level BPE is trained,
then for each seed every model is trained by :class:`retentive.training.Trainer` on the same batches (the sampler's
seed is the run's seed) and evaluated on the held-out tokens at the training length T, 2T and 4T. The peers
(torchscale's and yet-another-retnet's RetNets, parameter-matched, :class:`peers.PeerLM`) take part where they are
installed: run under the benchmark environment (``make bench-quality`` does). Results: ``<out>/bench_quality.json``,
a table in ``<out>/benchmarks.md``, ``bench_quality.png``.

    python benchmarks/quality.py                  # the four models, 2 corpora, 3 seeds
    python benchmarks/quality.py --ablation       # retentive's RetNet with one choice changed at a time
    python benchmarks/quality.py --lr-sweep       # RetNet and the Transformer at three learning rates
    python benchmarks/quality.py --quick          # tiny (CI)

Runs go to ``--jobs`` worker processes (default: one per core, one thread each).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402
from benchkit import DOCS, environment, markdown_table, save_figure, subplots, write_section  # noqa: E402
from retentive.baselines import count_parameters, model_from_preset  # noqa: E402
from retentive.data import (  # noqa: E402
    EvalWindows,
    TokenWindows,
    build_tokenizer,
    load_token_splits,
    read_corpus,
    tokenize_corpus,
)
from retentive.training import TrainConfig, Trainer, seed_everything  # noqa: E402

log = logging.getLogger("bench.quality")
# label -> kind: "retnet" (this library), a peer (peers.PEERS), "transformer" (the Llama twin)
MODELS = {"RetNet": "retnet", "torchscale RetNet": "torchscale", "yet-another-retnet": "yet-another-retnet"}
MODELS["Transformer"] = "transformer"
# label -> (RetNetConfig overrides, TrainConfig overrides): one choice changed from the defaults at a time.
# "ffn_scale" multiplies the FFN width (a gated FFN has three matrices: 2/3 of the width keeps the parameters).
ABLATIONS: dict[str, tuple[dict, dict]] = {
    "defaults": ({}, {}),
    "embedding and head init N(0, 0.02) (before)": ({"embedding_init_std": 0.02}, {}),
    "head norm: RMSNorm without affine (torchscale)": ({"head_norm": "rmsnorm"}, {}),
    "FFN: SwiGLU, 2/3 width (torchscale-like)": ({"ffn_activation": "swiglu", "ffn_scale": 2 / 3}, {}),
    "gate: gelu (seed repository)": ({"gate_fn": "gelu"}, {}),
    "decay: linspace (ViR)": ({"decay": "linspace"}, {}),
    "decay + retention normalizations on": ({"normalize_decay": True, "normalize_retention": True}, {}),
    "no rotary (no theta)": ({"rotary": False}, {}),
    "value_factor 1, FFN 1.75x wider (parameters kept)": ({"value_factor": 1, "ffn_scale": 1.75}, {}),
}
LEARNING_RATES = [1e-3, 2e-3, 4e-3]
FULL = {
    "corpora": ["shakespeare", "kjv"],
    "seeds": [0, 1, 2],
    "model": {"dim_model": 128, "num_layers": 4, "num_heads": 4, "ffn_dim": 256},
    "tokenizer": "bpe",
    "vocab_size": 2048,
    "seq_len": 128,
    "batch_size": 16,
    "steps": 250,
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


def build_model(kind: str, vocab_size: int, model: dict, overrides: dict):
    """A fresh model of ``kind`` at the plan's sizes; ``overrides`` change retentive's RetNetConfig."""
    if kind == "transformer":  # the Llama twin of the default RetNet
        return model_from_preset("transformer-tiny", vocab_size=vocab_size, **model, **overrides)
    if kind == "retnet":
        fields = model | {k: v for k, v in overrides.items() if k != "ffn_scale"}
        fields["ffn_dim"] = round(fields["ffn_dim"] * overrides.get("ffn_scale", 1))
        return model_from_preset("retnet-tiny", vocab_size=vocab_size, **fields)
    target = count_parameters(model_from_preset("retnet-tiny", vocab_size=vocab_size, **model))
    return peers.PeerLM(kind, vocab_size, model["dim_model"], model["num_layers"], model["num_heads"], target)


def train_and_evaluate(job: dict, plan: dict) -> dict:
    """Train one model (``job``: kind, overrides, train overrides, seed, token directory, vocabulary) and return its
    validation perplexity at each evaluation length."""
    seed = job["seed"]
    splits = load_token_splits(job["tokens"])
    seed_everything(seed)
    model = build_model(job["kind"], job["vocab_size"], plan["model"], job["overrides"])
    config = TrainConfig(
        **{
            "steps": plan["steps"],
            "lr": plan["lr"],
            "warmup": plan["warmup"],
            "eval_interval": 0,
            "ckpt_interval": 0,
            "log_interval": max(1, plan["steps"] // 10),
            "device": "cpu",
            "progress": False,
        }
        | job["train"]
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
        "summary": f"val ppl {ppl}",
        "final_train_loss": result.losses[-1],
        "train_seconds": seconds,
        "parameters": count_parameters(model),
        "lr": config.lr,
    }


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(
    jobs: list[dict], plan: dict, workers: int, work: Callable[[dict, dict], dict] | None = None
) -> list[dict]:
    """``work(job, plan)`` (default :func:`train_and_evaluate`) for every job, ``workers`` at a time in fresh
    processes of ``threads`` torch threads each (one process: here)."""
    work = work or train_and_evaluate
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with (
        contextlib.nullcontext()
        if workers <= 1
        else concurrent.futures.ProcessPoolExecutor(workers, context, _init_worker, (threads,))
    ) as pool:
        futures = [pool.submit(work, job, plan) if pool else job for job in jobs]
        results = []
        for job, future in zip(jobs, futures, strict=True):
            results.append(future.result() if pool else work(job, plan))
            where = job.get("corpus", "")
            log.info("%-12s %-48s seed %d: %s", where, job["label"], job["seed"], results[-1].get("summary", "done"))
        return results


def models_here() -> dict[str, str]:
    """The models of MODELS that can be built in this environment (the peers need ``make bench-env``)."""
    here = {}
    for label, kind in MODELS.items():
        reason = peers.available(kind) if kind in peers.PEERS else None
        if reason:
            log.warning("%s left out: %s", label, reason)
        else:
            here[label] = kind
    return here


def run_all(plan: dict, cache: Path, variants: dict[str, tuple[str, dict, dict]], workers: int) -> dict:
    """Every (corpus, seed, variant) run of ``plan``; ``variants``: label -> (kind, overrides, train overrides)."""
    results: dict = {"plan": plan, "corpora": {}}
    jobs = []
    for corpus in plan["corpora"]:
        docs = load_corpus(corpus, cache, plan["max_chars"])
        tokenizer = build_tokenizer(plan["tokenizer"], docs, plan["vocab_size"])
        splits = tokenize_corpus(docs, tokenizer, cache / "tokens")
        results["corpora"][corpus] = {
            "train_tokens": len(splits.train),
            "val_tokens": len(splits.val),
            "vocab_size": tokenizer.vocab_size,
            "runs": {label: {} for label in variants},
        }
        for seed in plan["seeds"]:
            for label, (kind, overrides, train) in variants.items():
                jobs.append(
                    {
                        "corpus": corpus,
                        "label": label,
                        "kind": kind,
                        "overrides": overrides,
                        "train": train,
                        "seed": seed,
                        "tokens": str(splits.directory),
                        "vocab_size": tokenizer.vocab_size,
                    }
                )
    for job, run in zip(jobs, run_jobs(jobs, plan, workers), strict=True):
        results["corpora"][job["corpus"]]["runs"][job["label"]][str(job["seed"])] = run
    return results


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def _ppl(runs: dict, factor: str) -> list[float]:
    return [run["val_ppl"][factor] for run in runs.values()]


def _caption(results: dict, what: str) -> list[str]:
    plan, meta = results["plan"], results["meta"]
    m = plan["model"]
    return [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), float32, "
        f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}. "
        f"Command: `{meta['command'].strip()}`.",
        f"{what} {m['num_layers']} layers, d={m['dim_model']}, {m['num_heads']} heads, tokenizer: {plan['tokenizer']} "
        f"(a BPE of {plan['vocab_size']} is trained on each corpus). Same trainer and recipe: AdamW (0.9, 0.98), "
        f"weight decay 0.05, lr {plan['lr']} with {plan['warmup']} warm-up steps and a cosine, {plan['steps']} steps "
        f"of {plan['batch_size']} x {plan['seq_len']} tokens "
        f"({plan['steps'] * plan['batch_size'] * plan['seq_len']:,} tokens), the same batches for every model "
        f"(seeded). Validation perplexity over seeds {plan['seeds']} (mean ± sd) at the training length "
        f"T={plan['seq_len']}"
        + (" and at 2T and 4T (no fine-tuning at the longer lengths)." if len(plan["eval_lengths"]) > 1 else "."),
        "",
    ]


def quality_markdown(results: dict, plot: str) -> str:
    """Every model's perplexity (mean ± sd over seeds) and retentive's gaps, per corpus and evaluation length."""
    plan = results["plan"]
    labels = list(next(iter(results["corpora"].values()))["runs"])
    peer_label = next((label for label in labels if MODELS.get(label) in peers.PEERS), None)
    # the gaps: retentive's RetNet against the Transformer and the first peer, where this run has them
    others = [label for label in ("Transformer", peer_label) if "RetNet" in labels and label in labels]
    lines = _caption(
        results,
        "Every model: tied embeddings except yet-another-retnet's (its own untied output layer), parameters matched "
        "within 2% by solving the FFN width (the Transformer is the Llama twin, `transformer-tiny` with the same "
        "overrides);",
    )
    header = ["corpus", "length", *(f"{label} ppl" for label in labels), *(f"gap RetNet - {o}" for o in others)]
    rows = []
    for corpus, entry in results["corpora"].items():
        for factor in map(str, plan["eval_lengths"]):
            ppl = {label: _ppl(entry["runs"][label], factor) for label in labels}
            gaps = [[a - b for a, b in zip(ppl["RetNet"], ppl[other], strict=True)] for other in others]
            rows.append(
                [f"{corpus} ({entry['train_tokens']:,} train tokens)", f"{int(factor) * plan['seq_len']} ({factor}T)"]
                + [_mean_sd(ppl[label]) for label in labels]
                + [_mean_sd(g) for g in gaps]
            )
    lines += [markdown_table(header, rows), "", f"![quality]({plot})", ""]
    return "\n".join(lines)


def variants_markdown(results: dict, what: str) -> str:
    """One row per variant and corpus: perplexity at T (mean ± sd over seeds) and the change from the first row."""
    lines = _caption(results, what)
    header = ["corpus", "variant", "parameters", "val ppl at T", "change from the first row"]
    rows = []
    for corpus, entry in results["corpora"].items():
        runs = entry["runs"]
        base = statistics.mean(_ppl(next(iter(runs.values())), "1"))
        for label, variant in runs.items():
            ppl = _ppl(variant, "1")
            params = next(iter(variant.values()))["parameters"]
            change = statistics.mean(ppl) - base
            rows.append(
                [corpus, label, f"{params:,}", _mean_sd(ppl), "" if label == next(iter(runs)) else f"{change:+.2f}"]
            )
    lines += [markdown_table(header, rows), ""]
    return "\n".join(lines)


def plot_quality(results: dict, path: Path) -> None:
    """Perplexity against evaluation length, per corpus, with the spread over seeds."""
    plan = results["plan"]
    corpora = list(results["corpora"])
    fig, axes = subplots(1, len(corpora), figsize=(5 * len(corpora), 3.8), squeeze=False)
    lengths = [f * plan["seq_len"] for f in plan["eval_lengths"]]
    for ax, corpus in zip(axes[0], corpora, strict=True):
        for label, runs in results["corpora"][corpus]["runs"].items():
            per_len = [_ppl(runs, str(f)) for f in plan["eval_lengths"]]
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
    save_figure(fig, path)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training benchmark takes: where results and caches go, the plan's overrides, the workers."""
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "retentive" / "bench")
    parser.add_argument("--corpora", nargs="+", help="override: shakespeare, kjv, or a text file / folder")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--steps", type=int, help="override the optimizer steps per run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (1: in this one)")


def plan_of(args: argparse.Namespace, quick: dict, full: dict) -> dict:
    """The plan (``quick`` with ``--quick``, else ``full``) with the overrides of :func:`add_run_arguments`."""
    plan = dict(quick if args.quick else full)
    for key in ("corpora", "seeds", "steps"):
        if getattr(args, key):
            plan[key] = getattr(args, key)
    return plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, a slice of each corpus, 3 steps")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--ablation", action="store_true", help="retentive's RetNet, one choice changed at a time")
    kind.add_argument("--lr-sweep", action="store_true", help="RetNet and the Transformer at " + str(LEARNING_RATES))
    add_run_arguments(parser)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"of the comparison: some of {list(MODELS)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = plan_of(args, QUICK, FULL)
    if args.ablation:
        name, heading = "ablation", "## Ablation: retentive's RetNet, one choice at a time"
        plan |= {"eval_lengths": [1]}
        variants = {label: ("retnet", overrides, train) for label, (overrides, train) in ABLATIONS.items()}
        what = "retentive's RetNet with one choice changed from the defaults per row (tied embeddings);"
    elif args.lr_sweep:
        name, heading = "lr", "## Learning rate: RetNet and the Transformer"
        plan |= {"eval_lengths": [1]}
        llama = {"embedding_init_std": 0.02}  # the twin's embedding as Llama initializes it (the twin's before)
        variants = {f"RetNet lr {lr:g}": ("retnet", {}, {"lr": lr}) for lr in LEARNING_RATES}
        variants |= {
            f"Transformer lr {lr:g}, embedding N(0, 0.02)": ("transformer", llama, {"lr": lr}) for lr in LEARNING_RATES
        }
        variants["Transformer lr 0.002, embedding N(0, d^-1/2) (the twin's default)"] = ("transformer", {}, {})
        what = "retentive's RetNet and its Transformer twin at each peak learning rate (tied embeddings);"
    else:
        name, heading = "quality", "## Quality: RetNet, the peers and the Transformer, same recipe"
        variants = {label: (kind, {}, {}) for label, kind in models_here().items() if label in args.models}
    started = time.time()
    results = run_all(plan, args.cache, variants, args.jobs)
    results["meta"] = environment("quality.py", started, quick=args.quick, argv=sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = ("bench_quick_" if args.quick else "bench_") + name
    (args.out / f"{prefix}.json").write_text(json.dumps(results, indent=1))
    if name == "quality":
        plot_quality(results, args.out / f"{prefix}.png")
        body = quality_markdown(results, f"{prefix}.png")
    else:
        body = variants_markdown(results, what)
    if args.quick:
        (args.out / f"{prefix}.md").write_text(body)
    else:
        write_section(args.out / "benchmarks.md", heading, body, name=name)
    log.info("done in %.0f s", time.time() - started)


if __name__ == "__main__":
    main()
