"""Does ``retentive train --documents`` change what a model learns? Two runs on the same short, unrelated documents,
one reading each training window as one stream (the default) and one reading each document of a window on its own,
evaluated the same two ways on held-out documents.

    python benchmarks/documents.py          # writes "Packed documents: what a model learns" in docs/benchmarks.md
    python benchmarks/documents.py --quick  # tiny sizes (what the test runs)

The documents: the scenes of Shakespeare's plays (the ``shakespeare`` package), those of 1,500 to 6,000 characters,
in a shuffled order, so that the scene before a scene is unrelated to it; one in ten, drawn at random, is held out.
Both runs train ``retnet-tiny`` with the same seed, tokenizer (a BPE trained on the training scenes), windows of
256 tokens (about a third of a scene: most windows hold a boundary), batches and steps; they differ in
``--documents`` alone, and run side by side on one torch thread each.

The held-out scenes are read two ways: alone (each from a fresh state: what a prompt gets) and as a stream
(joined with the end-of-text in the order given, in windows of 256 tokens, as the default run trains). Reported:
the mean loss per token, alone also over each scene's first 32 tokens (where what came before matters most).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit

SECTION = "## Packed documents: what a model learns"
FULL = {"steps": 600, "seq_len": 256, "batch": 16, "preset": "retnet-tiny", "scenes": None}
QUICK = {"steps": 2, "seq_len": 32, "batch": 2, "preset": "retnet-tiny", "scenes": 40}
RUNS = {"one stream (default)": [], "--documents": ["--documents"]}
FIRST = 32  # the tokens at the start of each scene reported on their own
PIECE = 3000  # characters: a scene longer than this is cut into pieces of about this length
SCENE = re.compile(r"^(?:SCENE|Scene) [IVXL]+\b", re.M)


def scenes(limit: int | None = None, seed: int = 0) -> list[str]:
    """The plays' scenes, those longer than ``PIECE`` characters cut at line ends into pieces of about that length,
    the pieces under a third of it dropped; shuffled (``limit``: the first that many)."""
    from retentive.data.corpus import shakespeare_files, strip_gutenberg

    found = []
    for path in shakespeare_files():
        text = strip_gutenberg(path.read_text(encoding="utf-8"))
        starts = [m.start() for m in SCENE.finditer(text)]  # none in the poems
        for a, b in zip(starts, [*starts[1:], len(text)][: len(starts)], strict=True):
            piece = ""
            for line in text[a:b].strip().splitlines(keepends=True):
                piece += line
                if len(piece) >= PIECE:
                    found.append(piece.strip())
                    piece = ""
            found.append(piece.strip())
    found = [s for s in found if len(s) >= PIECE // 3]
    random.Random(seed).shuffle(found)
    return found[:limit]


def train(name: str, folder: Path, out: Path, cfg: dict, seed: int) -> subprocess.Popen:
    """Start ``retentive train`` for the run ``name`` on one thread."""
    command = [
        sys.executable, "-m", "retentive.cli", "train", "--data", str(folder), "--out", str(out),
        "--preset", cfg["preset"], "--steps", str(cfg["steps"]), "--seq-len", str(cfg["seq_len"]),
        "--batch-size", str(cfg["batch"]), "--val-fraction", "0", "--seed", str(seed), "--eval-interval",
        str(10 * cfg["steps"]), "--no-progress", *RUNS[name],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@torch.no_grad()
def evaluate(run: Path, held_out: list[str], seq_len: int) -> dict[str, float]:
    """Mean loss per token of the run's final model on ``held_out``: each scene alone (and its first ``FIRST``
    tokens), and the scenes as one stream in windows of ``seq_len``."""
    from retentive.data import load_tokenizer
    from retentive.models import RetNetForCausalLM
    from retentive.training import resolve_checkpoint

    checkpoint = resolve_checkpoint(run)
    tokenizer, model = load_tokenizer(checkpoint), RetNetForCausalLM.from_pretrained(checkpoint).eval()
    eos = tokenizer.eos_id
    losses: dict[str, list[torch.Tensor]] = {"alone": [], "alone, first tokens": [], "stream": []}
    for text in held_out:  # a scene from a fresh state, opened by the end-of-text as in training
        ids = torch.tensor([[eos, *tokenizer.encode(text)]])
        logits = model(ids, mode="chunkwise", chunk_size=256).logits[0, :-1]
        loss = F.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
        losses["alone"].append(loss)
        losses["alone, first tokens"].append(loss[:FIRST])
    stream = torch.tensor([t for text in held_out for t in (eos, *tokenizer.encode(text))])
    windows = stream[: len(stream) // (seq_len + 1) * (seq_len + 1)].view(-1, seq_len + 1)
    for rows in windows.split(16):
        logits = model(rows[:, :-1], mode="chunkwise", chunk_size=256).logits
        losses["stream"].append(F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="none"))
    return {key: torch.cat(values).mean().item() for key, values in losses.items()}


def markdown(env: dict, host: str, cfg: dict, counts: dict, results: dict) -> str:
    rows = [
        (name, *(f"{r[key]:.3f}" for key in ("alone", "alone, first tokens", "stream"))) for name, r in results.items()
    ]
    table = benchkit.markdown_table(
        ("training windows read as", "held out, each alone", f"its first {FIRST} tokens", "held out, as a stream"),
        rows,
    )
    return (
        f"Command: `{env['command']}` ({host}; torch {env['versions']['torch']}; {env['date']}). {cfg['preset']}, "
        f"seed {cfg['seed']}, {cfg['steps']:,} steps of {cfg['batch']} windows of {cfg['seq_len']} tokens; "
        f"{counts['train']:,} training "
        f"scenes, {counts['test']:,} held out. Mean loss per token (nats).\n\n{table}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (what the test runs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    parser.add_argument("--work", type=Path, default=Path("runs/documents"), help="where the runs are written")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (the documents stay the same)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started, host = time.time(), benchkit.machine()
    docs = scenes(cfg["scenes"])
    held = set(random.Random(1).sample(range(len(docs)), len(docs) // 10))
    train_docs, held_out = [d for i, d in enumerate(docs) if i not in held], [docs[i] for i in sorted(held)]
    folder = args.work / "scenes"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.txt"):
        old.unlink()
    for i, text in enumerate(train_docs):  # read in the order of their names: the shuffled order
        (folder / f"{i:05d}.txt").write_text(text + "\n", encoding="utf-8")
    names = {name: args.work / ("documents" if RUNS[name] else "stream") for name in RUNS}
    jobs = {name: train(name, folder, names[name], cfg, args.seed) for name in RUNS}
    for name, job in jobs.items():
        log, _ = job.communicate()
        if job.returncode:
            raise SystemExit(f"the run {name!r} failed:\n{log[-3000:]}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results = {name: evaluate(names[name], held_out, cfg["seq_len"]) for name in RUNS}
    env = benchkit.environment("documents.py", started, args.quick, sys.argv[1:] if argv is None else argv)
    counts = {"train": len(train_docs), "test": len(held_out)}
    text = markdown(env, host, cfg | {"seed": args.seed}, counts, results)
    benchkit.write_section(args.out, SECTION, text, name="documents")
    print(text)


if __name__ == "__main__":
    main()
