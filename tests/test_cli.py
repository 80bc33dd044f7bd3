"""The command line: `retentive train` a few steps on a tiny config, then `retentive generate` from its checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from retentive.cli import main
from retentive.data import ByteTokenizer, read_corpus
from retentive.streamer import TokenStreamer

TINY = ["--set", "dim_model=32", "--set", "num_layers=1", "--set", "num_heads=2", "--set", "ffn_dim=64"]


@pytest.fixture(scope="module", autouse=True)
def token_cache(tmp_path_factory: pytest.TempPathFactory):
    """Token files go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETENTIVE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample of the real corpus as the user's own text file."""
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text("".join(d[:8000] for d in read_corpus("shakespeare")[:4]))
    return path


def _train(corpus: Path, out: Path, *extra: str) -> None:
    main(
        ["train", "--data", str(corpus), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "300",
         "--steps", "6", "--seq-len", "32", "--batch-size", "4", "--warmup", "2", "--eval-interval", "3",
         "--eval-batches", "2", "--ckpt-interval", "3", "--no-progress", *TINY, *extra]
    )  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    _train(corpus, out)
    return out


def test_train_writes_a_run(run_dir: Path) -> None:
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"step-00000003", "step-00000006"}
    ckpt = run_dir / "checkpoints" / "step-00000006"
    assert {"model.safetensors", "config.json", "trainer_state.pt", "tokenizer.json", "manifest.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == 300
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["val_ppl"] > 1
    assert (run_dir / "loss.png").is_file()


def test_generate_streams_from_the_checkpoint(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    main(["generate", str(run_dir), "--prompt", "KING.\n", "--max-new-tokens", "12", "--temperature", "0"])
    greedy = capsys.readouterr().out
    assert greedy.startswith("KING.\n") and len(greedy) > len("KING.\n") + 5
    main(["generate", str(run_dir), "--prompt", "KING.\n", "--max-new-tokens", "12", "--temperature", "0"])
    assert capsys.readouterr().out == greedy
    main(["generate", str(run_dir / "checkpoints" / "step-00000003"), "--prompt", "O", "--max-new-tokens", "8",
          "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.3", "--seed", "1"])  # fmt: skip
    main(["generate", str(run_dir), "--prompt", "O", "--max-new-tokens", "6", "--num-beams", "2"])
    assert capsys.readouterr().out.count("O") >= 2


def test_bad_input_gets_a_clear_error(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--prompt is empty"):
        main(["generate", str(run_dir), "--prompt", ""])
    with pytest.raises(SystemExit, match="no checkpoint in"):
        main(["generate", str(tmp_path), "--prompt", "O"])
    with pytest.raises(SystemExit, match="--resume"):
        _train(corpus, run_dir)  # the same run again, without --resume
    with pytest.raises(SystemExit, match=r"different run \(lm.seq_len: 32 -> 16"):
        _train(corpus, run_dir, "--seq-len", "16")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="holds no text files"):
        _train(empty, tmp_path / "out")


def test_resume_extends_the_run(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    _train(corpus, copy, "--resume", "--steps", "9")
    assert (copy / "checkpoints" / "step-00000009").is_dir()


def test_streamer_waits_for_whole_characters() -> None:
    class Sink:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, s: str) -> None:
            self.writes.append(s)

        def flush(self) -> None:
            pass

    sink = Sink()
    streamer = TokenStreamer(ByteTokenizer(), stream=sink)
    streamer.put(torch.tensor([[65]]))  # the prompt: skipped
    for byte in "é!".encode():
        streamer.put(torch.tensor([byte]))
    streamer.end()
    assert [w for w in sink.writes if w] == ["é", "!", "\n"]


def test_demo_runs_end_to_end(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small = ["--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", "--sample-tokens", "4"]
    small += ["--greedy-tokens", "3"]
    main(["demo", "--data", str(corpus), *small, "--contexts", "8", "40", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "validation perplexity" in out and "unigram perplexity" in out
    assert "pick the SAME tokens" in out
    assert out.count("ms/token") == 2
