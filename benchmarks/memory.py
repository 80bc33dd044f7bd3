"""How far back a model remembers: loss per position and recall at a distance, RetNet vs the Transformer.

Every model is trained by :class:`retentive.training.Trainer` on the same mixture at the quality benchmark's size
(benchmarks/quality.py): windows of T tokens from each shipped corpus (Shakespeare and the King James Bible, one
byte-level BPE trained on both), each with a key-value pair planted in its text and queried later (recall).
Then, on held-out data, up to 16 T:

- **loss per position**: the mean next-token loss at each position of held-out windows of 16 T tokens of each
  corpus (RetNet in the recurrent form, token by token; the Transformer with its rotary positions as configured);
- **recall at a distance d**: held-out text with ``SET k v`` planted and ``GET k`` asked d tokens after ``v``: the
  share of probes whose next-token argmax is ``v``.

Variants: RetNet with the paper's decay γ_h = 1 - 2^(-5-h), ViR's linspace, a longer-horizon schedule
γ_h = 1 - 2^(-8-h), the paper's decay with both normalizations on, and the Transformer twin. Each head's horizon
(tokens until γ^d < 1%, :func:`retentive.memory.horizon`) is written beside the curves.

    python benchmarks/memory.py            # 5 models x 3 seeds; writes the "Memory" section of docs/benchmarks.md
    python benchmarks/memory.py --quick    # tiny (the test)

Results: ``<out>/bench_memory.json`` and ``bench_memory.png``; runs go to ``--jobs`` worker processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402
from benchkit import environment, markdown_table, save_figure, subplots, write_section  # noqa: E402
from retentive.baselines import count_parameters  # noqa: E402
from retentive.data import build_tokenizer, load_token_splits, tokenize_corpus  # noqa: E402
from retentive.memory import horizon  # noqa: E402
from retentive.ops import gamma_schedule  # noqa: E402
from retentive.training import TrainConfig, Trainer, seed_everything  # noqa: E402

log = logging.getLogger("bench.memory")

LONG_DECAY = "longer horizon: γ = 1 - 2^(-8-h)"
# label -> (kind, RetNetConfig overrides); a decay of None is filled in per plan (it needs the number of heads)
VARIANTS: dict[str, tuple[str, dict]] = {
    "RetNet, γ = 1 - 2^(-5-h) (paper)": ("retnet", {}),
    "RetNet, linspace γ (ViR)": ("retnet", {"decay": "linspace"}),
    f"RetNet, {LONG_DECAY}": ("retnet", {"decay": None}),
    "RetNet, paper γ + normalizations": ("retnet", {"normalize_decay": True, "normalize_retention": True}),
    "Transformer": ("transformer", {}),
}
FULL = quality.FULL | {
    "steps": 800,
    "recall_share": 1.0,  # the share of each batch's rows that carry a planted pair (the text around it stays)
    "queries": 4,  # queries of the pair per training row
    "keys": 32,  # distinct key tokens; as many value tokens
    "span": 16,  # evaluate up to span x T
    "eval_windows": 8,  # held-out windows of span x T tokens per corpus
    "distances": [16, 32, 64, 128, 256, 512, 1024, 2048],
    "probes": 64,  # recall probes per distance
}
QUICK = quality.QUICK | {
    "steps": 3,
    "recall_share": 0.25,
    "queries": 2,
    "keys": 8,
    "span": 4,
    "eval_windows": 2,
    "distances": [16, 64],
    "probes": 4,
}


@dataclass(frozen=True)
class Recall:
    """The recall task's tokens, appended after the text vocabulary: SET, GET, ``keys`` keys, ``keys`` values.

    A planted pair is ``SET k v``; its query is ``GET k v``, whose ``v`` the model must predict after ``GET k``.
    """

    text_vocab: int
    keys: int

    @property
    def set_id(self) -> int:
        return self.text_vocab

    @property
    def get_id(self) -> int:
        return self.text_vocab + 1

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + 2 + 2 * self.keys

    def key(self, i: np.ndarray | int) -> np.ndarray | int:
        return self.text_vocab + 2 + i

    def value(self, i: np.ndarray | int) -> np.ndarray | int:
        return self.text_vocab + 2 + self.keys + i

    def plant(self, row: np.ndarray, queries: int, rng: np.random.Generator) -> np.ndarray:
        """``row`` (N,) with one pair set and then queried ``queries`` times, at random 3-token slots (a copy).

        One pair per row: the value is the only value token of the row, so the task is holding it over a distance,
        not telling pairs apart (that is multi-query associative recall, a question of the state's capacity)."""
        row = row.copy()
        slots = np.sort(rng.choice(len(row) // 3, 1 + queries, replace=False)) * 3
        key, value = self.key(rng.integers(self.keys)), self.value(rng.integers(self.keys))
        row[slots[0] : slots[0] + 3] = (self.set_id, key, value)
        for at in slots[1:]:
            row[at : at + 3] = (self.get_id, key, value)
        return row

    def probe(self, text: np.ndarray, distance: int, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
        """One probe over ``text`` (at least ``distance + 19`` tokens): ``SET k v`` at 16, then text, then ``GET k``
        with its key ``distance`` tokens after ``v``. Returns (ids, the position whose next token is asked, ``v``)."""
        lead = 16
        at_key = lead + 2 + distance
        ids = text[: at_key + 1].copy()
        key, value = rng.integers(self.keys), rng.integers(self.keys)
        ids[lead : lead + 3] = (self.set_id, self.key(key), self.value(value))
        ids[at_key - 1 : at_key + 1] = (self.get_id, self.key(key))
        return ids, at_key, int(self.value(value))


class Mixture:
    """Training batches (B, T+1) from every corpus's windows, ``recall_share`` of the rows with a pair planted.

    Batch ``i`` depends only on (seed, i): the step is the resumable state.
    """

    def __init__(
        self, corpora: list[np.ndarray], recall: Recall, plan: dict, seed: int, rows: int | None = None
    ) -> None:
        self.corpora, self.recall, self.plan, self.seed = corpora, recall, plan, seed
        self.rows, self.step = rows or plan["batch_size"], 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.step))
        self.step += 1
        length = self.plan["seq_len"] + 1
        planted = round(self.rows * self.plan["recall_share"])
        batch = []
        for i in range(self.rows):
            tokens = self.corpora[i % len(self.corpora)]
            start = rng.integers(len(tokens) - length)
            row = tokens[start : start + length].astype(np.int64)
            batch.append(self.recall.plant(row, self.plan["queries"], rng) if i < planted else row)
        ids = torch.from_numpy(np.stack(batch))
        return {"input_ids": ids, "labels": ids}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


def logits_of(model: torch.nn.Module, kind: str, ids: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N, V): RetNet in the recurrent form, the Transformer as it is."""
    if kind == "retnet":
        return model(ids, mode="recurrent", use_cache=False).logits
    return model(ids).logits


def position_bins(length: int) -> list[int]:
    """Edges of the loss-per-position bins: 1, 2, 3, 4, 6, 8, 11, ... (a factor of about sqrt 2) up to ``length``."""
    edges = sorted({round(2 ** (i / 2)) for i in range(int(2 * math.log2(length)) + 1)})
    return [*edges, length + 1]


@torch.no_grad()
def loss_per_position(model: torch.nn.Module, kind: str, tokens: np.ndarray, length: int, windows: int) -> list[float]:
    """The mean next-token loss over held-out windows, binned by :func:`position_bins` (position 1 = the first
    predicted token)."""
    n = min(windows, (len(tokens) - 1) // (length + 1))
    if n < 1:
        raise ValueError(f"the held-out split has {len(tokens)} tokens, fewer than one window of {length + 1}")
    ids = torch.from_numpy(np.stack([tokens[i * (length + 1) : (i + 1) * (length + 1)] for i in range(n)]))
    ids = ids.long()
    loss = torch.cat(
        [
            F.cross_entropy(
                logits_of(model, kind, ids[i : i + 4, :-1]).transpose(1, 2), ids[i : i + 4, 1:], reduction="none"
            )
            for i in range(0, n, 4)
        ]
    ).mean(0)  # (length,)
    edges = position_bins(length)
    return [loss[a - 1 : b - 1].mean().item() for a, b in itertools.pairwise(edges)]


@torch.no_grad()
def recall_accuracy(
    model: torch.nn.Module, kind: str, recall: Recall, tokens: np.ndarray, plan: dict, seed: int
) -> dict[str, float]:
    """Per distance: the share of ``plan["probes"]`` probes answered with the planted value (held-out text)."""
    accuracy = {}
    for distance in plan["distances"]:
        rng = np.random.default_rng((seed, distance))
        length = distance + 19
        probes = []
        for _ in range(plan["probes"]):
            start = rng.integers(len(tokens) - length)
            probes.append(recall.probe(tokens[start : start + length].astype(np.int64), distance, rng))
        ids = torch.from_numpy(np.stack([p[0] for p in probes]))
        asked = probes[0][1]  # every probe asks at the same position
        answers = torch.tensor([p[2] for p in probes])
        correct = 0
        for i in range(0, len(probes), 16):
            logits = logits_of(model, kind, ids[i : i + 16, : asked + 1])[:, asked]
            correct += (logits.argmax(-1) == answers[i : i + 16]).sum().item()
        accuracy[str(distance)] = correct / len(probes)
    return accuracy


def train_and_measure(job: dict, plan: dict) -> dict:
    """Train one model of ``job`` on the mixture and measure its loss per position and its recall."""
    seed, kind = job["seed"], job["kind"]
    splits = {name: load_token_splits(path) for name, path in job["tokens"].items()}
    recall = Recall(job["text_vocab"], plan["keys"])
    seed_everything(seed)
    model = quality.build_model(kind, recall.vocab_size, plan["model"], job["overrides"])
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
    data = Mixture([s.train for s in splits.values()], recall, plan, seed)
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        result = Trainer(model, data, config, run_dir).fit()
        seconds = time.perf_counter() - t0
    model.eval()
    length = plan["span"] * plan["seq_len"]
    losses = {name: loss_per_position(model, kind, s.val, length, plan["eval_windows"]) for name, s in splits.items()}
    val = np.concatenate([s.val for s in splits.values()])
    accuracy = recall_accuracy(model, kind, recall, val, plan, seed)
    return {
        "loss_per_position": losses,
        "recall": accuracy,
        "summary": f"recall {accuracy}",
        "final_train_loss": result.losses[-1],
        "train_seconds": seconds,
        "parameters": count_parameters(model),
    }


def variants_for(plan: dict) -> dict[str, tuple[str, dict]]:
    """:data:`VARIANTS` with the longer-horizon gammas written out for the plan's number of heads."""
    heads = plan["model"]["num_heads"]
    longer = [1 - 2.0 ** (-8 - h) for h in range(heads)]
    return {
        label: (kind, overrides | ({"decay": longer} if overrides.get("decay", "") is None else {}))
        for label, (kind, overrides) in VARIANTS.items()
    }


def horizons(overrides: dict, heads: int) -> list[int]:
    """Each head's horizon (tokens until γ^d < 1%) for a RetNet variant's decay."""
    decay = overrides.get("decay", "retnet")
    gammas = gamma_schedule(decay, heads).tolist() if isinstance(decay, str) else decay
    return [horizon(g) for g in gammas]


def run_all(plan: dict, cache: Path, workers: int, models: list[str]) -> dict:
    """Tokenize the corpora with one tokenizer, then every (seed, variant) run of the variants ``models``."""
    docs = {corpus: quality.load_corpus(corpus, cache, plan["max_chars"]) for corpus in plan["corpora"]}
    tokenizer = build_tokenizer(plan["tokenizer"], [d for ds in docs.values() for d in ds], plan["vocab_size"])
    splits = {corpus: tokenize_corpus(ds, tokenizer, cache / "tokens") for corpus, ds in docs.items()}
    variants = {label: variant for label, variant in variants_for(plan).items() if label in models}
    jobs = [
        {
            "label": label,
            "kind": kind,
            "overrides": overrides,
            "seed": seed,
            "tokens": {corpus: str(s.directory) for corpus, s in splits.items()},
            "text_vocab": tokenizer.vocab_size,
        }
        for seed in plan["seeds"]
        for label, (kind, overrides) in sorted(variants.items(), key=lambda item: item[1][0] != "transformer")
    ]  # the Transformer first: whether it learns the recall task is known early
    runs: dict = {label: {} for label in variants}
    for job, run in zip(jobs, quality.run_jobs(jobs, plan, workers, train_and_measure), strict=True):
        runs[job["label"]][str(job["seed"])] = run
    heads = plan["model"]["num_heads"]
    return {
        "plan": plan,
        "corpora": {c: {"train_tokens": len(s.train), "val_tokens": len(s.val)} for c, s in splits.items()},
        "horizons": {
            label: horizons(overrides, heads) for label, (kind, overrides) in variants.items() if kind == "retnet"
        },
        "runs": runs,
    }


def _mean_sd(values: list[float], digits: int = 2) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _length_ranges(plan: dict) -> list[tuple[int, int]]:
    """The table's position ranges: [1, T], then each doubling up to span x T."""
    T, edges = plan["seq_len"], [1]
    while edges[-1] * 2 <= plan["span"]:
        edges.append(edges[-1] * 2)
    return [(1, T)] + [(a * T + 1, b * T) for a, b in itertools.pairwise(edges)]


def _range_loss(run: dict, corpus: str, plan: dict, first: int, last: int) -> float:
    """The mean loss over positions [first, last], from the bins (weighted by the positions each bin covers)."""
    edges = position_bins(plan["span"] * plan["seq_len"])
    total = count = 0.0
    for (a, b), loss in zip(itertools.pairwise(edges), run["loss_per_position"][corpus], strict=True):
        overlap = min(b - 1, last) - max(a, first) + 1
        if overlap > 0:
            total, count = total + loss * overlap, count + overlap
    return total / count


def memory_markdown(results: dict, plot: str) -> str:
    """The caption, the horizons, loss per position range and recall per distance (mean ± sd over seeds)."""
    plan, meta, runs = results["plan"], results["meta"], results["runs"]
    m, T = plan["model"], plan["seq_len"]
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores, load average {meta['load']}), float32, "
        f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}. "
        f"Command: `{meta['command'].strip()}`.",
        f"Every model: {m['num_layers']} layers, d={m['dim_model']}, {m['num_heads']} heads (the quality benchmark's "
        f"size, parameters matched), one tokenizer ({plan['tokenizer']}, {plan['vocab_size']}) trained on "
        f"{' and '.join(results['corpora'])}, plus {2 + 2 * plan['keys']} recall tokens. Same trainer, same batches: "
        f"{plan['steps']} steps of {plan['batch_size']} x {T} tokens, lr {plan['lr']}, each batch's rows alternating "
        f"between the corpora, {plan['recall_share']:.0%} of them with one pair planted in the text and queried "
        f"{plan['queries']} times. "
        f"Seeds {plan['seeds']} (mean ± sd). Evaluated on held-out text up to {plan['span'] * T} tokens "
        f"({plan['span']} T); RetNet in the recurrent form.",
        "",
        "Horizon of each head (tokens until γ^d < 1%):",
        "",
        markdown_table(
            ["variant", *(f"head {h}" for h in range(m["num_heads"]))],
            [[label, *(f"{h:,}" for h in hs)] for label, hs in results["horizons"].items()],
        ),
        "",
        "Next-token loss (nats) by position in held-out windows:",
        "",
    ]
    ranges = _length_ranges(plan)
    rows = []
    for corpus in results["corpora"]:
        for label, seeds in runs.items():
            cells = [_mean_sd([_range_loss(r, corpus, plan, a, b) for r in seeds.values()], 3) for a, b in ranges]
            rows.append([corpus, label, *cells])
    lines += [markdown_table(["corpus", "model", *(f"{a}-{b}" for a, b in ranges)], rows), ""]
    lines += [
        f"Recall at distance d (share of {plan['probes']} probes per seed whose next token is the planted value; "
        f"chance {1 / plan['keys']:.0%}):",
        "",
    ]
    distances = plan["distances"]
    rows = [
        [label, *(_mean_sd([r["recall"][str(d)] for r in seeds.values()]) for d in distances)]
        for label, seeds in runs.items()
    ]
    header = ["model", *(f"d={d}" + (" (>T)" if d > T else "") for d in distances)]
    lines += [markdown_table(header, rows), "", f"![memory]({plot})", ""]
    return "\n".join(lines)


def plot_memory(results: dict, path: Path) -> None:
    """Loss per position (one panel per corpus) and recall per distance, each model's mean over seeds."""
    plan, runs = results["plan"], results["runs"]
    corpora = list(results["corpora"])
    fig, axes = subplots(1, len(corpora) + 1, figsize=(5 * (len(corpora) + 1), 3.8), squeeze=False)
    edges = position_bins(plan["span"] * plan["seq_len"])
    middles = [math.sqrt(a * (b - 1)) for a, b in itertools.pairwise(edges)]
    for ax, corpus in zip(axes[0], corpora, strict=False):
        for label, seeds in runs.items():
            curves = np.array([r["loss_per_position"][corpus] for r in seeds.values()])
            ax.plot(middles, curves.mean(0), marker=".", label=label)
        ax.axvline(plan["seq_len"], color="gray", linestyle=":", label="training length")
        ax.set(xscale="log", xlabel="position", ylabel="next-token loss (nats)", title=corpus)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for label, seeds in runs.items():
        acc = np.array([[r["recall"][str(d)] for d in plan["distances"]] for r in seeds.values()])
        ax.errorbar(plan["distances"], acc.mean(0), yerr=acc.std(0), marker="o", capsize=3, label=label)
    ax.axvline(plan["seq_len"], color="gray", linestyle=":")
    ax.set(xscale="log", xlabel="distance d (tokens)", ylabel="recall accuracy", title="recall at a distance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, a slice of each corpus, 3 steps")
    quality.add_run_arguments(parser)
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="some variants")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = quality.plan_of(args, QUICK, FULL)
    started = time.time()
    results = run_all(plan, args.cache, args.jobs, args.models)
    results["meta"] = environment("memory.py", started, quick=args.quick, argv=sys.argv[1:])
    results["meta"]["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "bench_quick_memory" if args.quick else "bench_memory"
    (args.out / f"{prefix}.json").write_text(json.dumps(results, indent=1))
    plot_memory(results, args.out / f"{prefix}.png")
    body = memory_markdown(results, f"{prefix}.png")
    if args.quick:
        (args.out / f"{prefix}.md").write_text(body)
    else:
        write_section(
            args.out / "benchmarks.md", "## Memory: how far back RetNet and the Transformer remember", body, "memory"
        )
    log.info("done in %.0f s", time.time() - started)


if __name__ == "__main__":
    main()
