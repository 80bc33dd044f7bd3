"""The command line: `retentive train` a few steps on a tiny config, then `retentive generate` from its checkpoint."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import retentive
from retentive import RetNetForCausalLM
from retentive.cli import main
from retentive.data import ByteTokenizer, load_tokenizer, read_corpus
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


def _crashed_after_step_3(run_dir: Path, copy: Path) -> Path:
    """A copy of the 6-step run as a crash after its step-3 checkpoint would have left it."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000006")
    return copy


def test_readme_resume_continues_the_run_as_configured(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """The README's second line, `retentive train --data my_texts/ --out runs/mine --resume`: every option the run
    stored, none of the defaults, and the weights of the uninterrupted run bit for bit."""
    copy = _crashed_after_step_3(run_dir, tmp_path / "copy")
    stored = (copy / "run.json").read_text()
    main(["train", "--data", str(corpus), "--out", str(copy), "--resume"])
    assert (copy / "run.json").read_text() == stored
    final = "checkpoints/step-00000006/model.safetensors"
    resumed, straight = load_file(copy / final), load_file(run_dir / final)
    assert resumed.keys() == straight.keys()
    for name, weight in straight.items():
        assert torch.equal(resumed[name], weight), name
    keys = ("step", "loss", "grad_norm", "val_loss")
    records = [[[r.get(k) for k in keys] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
               for d in (copy, run_dir)]  # fmt: skip
    assert records[0] == records[1] and [r[0] for r in records[0]] == [3, 6]

    # options that keep it the same run change only themselves
    main(["train", "--data", str(corpus), "--out", str(copy), "--resume", "--steps", "8", "--device", "cpu",
          "--eval-interval", "4", "--activation-checkpointing"])  # fmt: skip
    assert (copy / "checkpoints" / "step-00000008").is_dir()
    run = json.loads((copy / "run.json").read_text())
    assert (run["train"]["steps"], run["train"]["device"], run["train"]["eval_interval"]) == (8, "cpu", 4)
    assert run["train"]["activation_checkpointing"] is True
    assert run["lm"] == json.loads(stored)["lm"]
    # and a switch the run stored turns off again
    main(["train", "--data", str(corpus), "--out", str(copy), "--resume", "--steps", "9",
          "--no-activation-checkpointing", "--no-progress"])  # fmt: skip
    run = json.loads((copy / "run.json").read_text())
    assert not run["train"].get("activation_checkpointing") and run["train"]["progress"] is False


@pytest.mark.parametrize(
    ("options", "change"),
    [
        (["--seq-len", "16"], "lm.seq_len: 32 -> 16"),
        (["--tokenizer", "bytes"], "lm.tokenizer: 'bpe' -> 'bytes'"),
        (["--set", "dim_model=64"], "lm.model_overrides.dim_model: 32 -> 64"),
        (["--lr", "0.1"], "train.lr: 0.002 -> 0.1"),
    ],
)
def test_resume_refuses_a_change_that_cannot_continue_the_run(
    run_dir: Path, corpus: Path, tmp_path: Path, options: list[str], change: str
) -> None:
    copy = _crashed_after_step_3(run_dir, tmp_path / "copy")
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    message = rf"^error: cannot resume: .*copy holds a run with a different configuration \({re.escape(change)}\),"
    with pytest.raises(SystemExit, match=message) as err:
        main(["train", "--data", str(corpus), "--out", str(copy), "--resume", *options])
    assert "\n" not in str(err.value.code)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before, "nothing written"
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    with pytest.raises(SystemExit, match=rf"\(lm.data: '{re.escape(str(corpus))}' -> '{re.escape(str(other))}'\)"):
        main(["train", "--data", str(other), "--out", str(copy), "--resume"])


@pytest.mark.slow
def test_torchrun_resumes_as_configured_and_says_a_refusal_once(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """Under torchrun with FSDP: a refused change is refused by both processes before the process group forms,
    process 0 prints the one line, the other leaves quietly, and no gloo "connection closed by peer" trace buries
    it; without the change, the README's resume line continues the run."""
    copy = _crashed_after_step_3(run_dir, tmp_path / "copy")
    src = str(Path(retentive.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    resume = ["retentive.cli", "train", "--data", str(corpus), "--out", str(copy), "--resume", "--parallel", "fsdp"]

    def launch(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([*torchrun, *resume, *options], env=env, capture_output=True, text=True, timeout=300)

    refused = launch("--seq-len", "16")
    assert refused.returncode != 0
    assert refused.stderr.count("error: cannot resume") == 1 and "(lm.seq_len: 32 -> 16)" in refused.stderr
    assert "closed by peer" not in refused.stderr.lower() and "[rank" not in refused.stderr, refused.stderr
    assert refused.stderr.count("Traceback") == refused.stderr.count("ChildFailedError:"), "torchrun's report only"
    resumed = launch()
    assert resumed.returncode == 0, resumed.stderr
    assert (copy / "checkpoints" / "step-00000006").is_dir() and "trained to step 6" in resumed.stdout


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


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--num-beams", "0", "--num-beams must be >= 1"),
        ("--temperature", "-1", "--temperature must be >= 0"),
        ("--top-p", "1.5", r"--top-p must lie in \(0, 1\]"),
        ("--top-p", "0", r"--top-p must lie in \(0, 1\]"),
        ("--max-new-tokens", "0", "--max-new-tokens must be >= 1"),
        ("--top-k", "-2", "--top-k must be >= 0"),
        ("--repetition-penalty", "0", "--repetition-penalty must be > 0"),
        ("--temperature", "1e-40", r"--temperature must be 0 \(greedy\) or at least 1e-05"),
    ],
)
def test_generation_options_are_refused_in_one_line(tmp_path: Path, option: str, value: str, message: str) -> None:
    with pytest.raises(SystemExit, match=rf"^error: {message}.*, got {re.escape(value)}(\.0)?$") as err:
        main(["generate", str(tmp_path / "not-read"), "--prompt", "O", option, value])
    assert "\n" not in str(err.value.code)


@pytest.mark.parametrize("device", ["nonsense", "cuda", "cuda:99"])
def test_a_device_this_machine_lacks_is_refused_in_one_line(tmp_path: Path, device: str) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=rf"^error: --device {device}.*") as err:
        main(["generate", str(tmp_path / "not-read"), "--prompt", "O", "--device", device])
    assert "\n" not in str(err.value.code)


def test_generate_accepts_a_save_pretrained_folder(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    ckpt = run_dir / "checkpoints" / "step-00000006"
    model = RetNetForCausalLM.from_pretrained(ckpt)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(SystemExit, match=r"no tokenizer in .*plain"):
        main(["generate", str(tmp_path / "plain"), "--prompt", "KING.\n", "--max-new-tokens", "8"])
    load_tokenizer(ckpt).save(tmp_path / "plain")
    args = ["--prompt", "KING.\n", "--max-new-tokens", "8", "--temperature", "0"]
    main(["generate", str(tmp_path / "plain"), *args])
    main(["generate", str(ckpt), *args])
    plain, from_run = capsys.readouterr().out.split("KING.\n")[1:]
    assert plain == from_run and len(plain) > 2


def test_a_damaged_checkpoint_hint_names_the_generate_command(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "step-00000006" / "model.safetensors").write_bytes(b"damaged")
    older = copy / "checkpoints" / "step-00000003"
    with pytest.raises(SystemExit, match=rf"is intact: retentive generate {re.escape(str(older))}$"):
        main(["generate", str(copy), "--prompt", "O"])
    with pytest.raises(SystemExit, match=r"no checkpoint in .*save_pretrained"):
        main(["generate", str(tmp_path), "--prompt", "O"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--seq-len", "0"], r"seq_len \(--seq-len\) must be an integer >= 1, got 0"),
        (["--batch-size", "0"], r"batch_size \(--batch-size\) must be an integer >= 1"),
        (["--val-fraction", "1"], r"val_fraction \(--val-fraction\) must lie in \[0, 1\)"),
        (["--vocab-size", "100"], r"vocab_size \(--vocab-size\) must be >= 258"),
        (["--set", "num_heads=3"], "dim_model .* must be a multiple of num_heads"),
        (["--set", "num_layer=3"], "unknown config field"),
        (["--min-lr-ratio", "2"], "min_lr_ratio must lie in"),
        (["--suffixes", ".py"], "holds no text files"),
    ],
)
def test_train_options_are_checked_before_anything_is_written(
    corpus: Path, tmp_path: Path, options: list[str], message: str
) -> None:
    with pytest.raises(SystemExit, match=message):
        _train(corpus.parent, tmp_path / "out", *options)
    assert not (tmp_path / "out").exists(), "nothing written: the corrected command is not 'a different run'"


def test_out_that_is_a_file_is_one_line(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SystemExit, match=r"^error: .*out is a file, not a run directory: choose another --out$"):
        _train(corpus, tmp_path / "out")


def test_data_folder_reads_the_suffixes_given_reports_what_it_skipped_and_refuses_binary_files(
    corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    (data / "pkg").mkdir(parents=True)
    text = corpus.read_text()
    (data / "pkg" / "module.py").write_text(text[:12000])
    (data / "guide.rst").write_text(text[12000:24000])
    (data / "notes.txt").write_text("skipped: not among the suffixes\n")
    (data / "logo.png").write_bytes(bytes(range(256)))
    with caplog.at_level(logging.INFO, logger="retentive.data.corpus"):
        _train(data, tmp_path / "out", "--suffixes", ".py,RST", "--steps", "2")
    summary = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    read = (data / "pkg" / "module.py").stat().st_size + (data / "guide.rst").stat().st_size
    assert f"reading 2 files ({read:,} bytes); skipped 2 files (" in summary and "1 .png" in summary
    assert json.loads((tmp_path / "out" / "run.json").read_text())["lm"]["suffixes"] == [".py", ".rst"]

    (data / "pkg" / "data.py").write_bytes(b"import os\n\x00\x01\x02")
    with pytest.raises(SystemExit, match=r"data\.py is a binary file \(a NUL byte at offset 10\)"):
        _train(data, tmp_path / "out2", "--suffixes", ".py,.rst")
    (data / "pkg" / "data.py").write_bytes("café".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"data\.py is not UTF-8 text \(byte 3 does not decode\)"):
        _train(data, tmp_path / "out2", "--suffixes", ".py,.rst")
    assert not (tmp_path / "out2").exists()
