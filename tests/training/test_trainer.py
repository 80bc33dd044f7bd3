"""The trainer: learning, exact resume, atomic checkpoints, the corrupt-checkpoint path, the run-directory guard."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tinylm import TinyLM

from retentive.data import EvalWindows, TensorBatches, TokenWindows
from retentive.training import (
    CheckpointError,
    TrainConfig,
    Trainer,
    checkpoint_dirs,
    prepare_run_dir,
    resolve_checkpoint,
    seed_everything,
    warmup_cosine,
)


def _tokens(n: int = 4000, vocab: int = 64) -> np.ndarray:
    # a learnable stream: a noisy cycle through the vocabulary
    rng = np.random.default_rng(0)
    base = np.arange(n) % vocab
    noise = rng.integers(0, vocab, n)
    return np.where(rng.random(n) < 0.2, noise, base).astype(np.uint16)


def _trainer(run_dir: Path, steps: int, resume: bool = False, dropout: float = 0.1, **cfg) -> Trainer:
    seed_everything(0)
    tokens = _tokens()
    model = TinyLM(dropout=dropout)
    config = TrainConfig(
        **{"steps": steps, "lr": 1e-2, "warmup": 2, "eval_interval": 3, "ckpt_interval": 4} | cfg, progress=False
    )
    return Trainer(
        model,
        TokenWindows(tokens, seq_len=16, batch_size=4, seed=1),
        config,
        run_dir,
        val_data=EvalWindows(tokens[-600:], seq_len=16, batch_size=4, max_batches=2),
        resume=resume,
    )


def test_loss_decreases_and_outputs_written(tmp_path: Path) -> None:
    result = _trainer(tmp_path, steps=30, dropout=0.0).fit()
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.5
    assert result.eval["val_ppl"] == pytest.approx(np.exp(result.eval["val_loss"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 30 and "val_loss" in records[-1] and "tok_per_s" in records[-1]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000024", "step-00000028", "step-00000030"]


def test_resume_continues_the_exact_trajectory(tmp_path: Path) -> None:
    straight = _trainer(tmp_path / "a", steps=10).fit().losses
    # the interrupted run: a checkpoint at step 4 and 8; it dies after step 6
    first = _trainer(tmp_path / "b", steps=10).fit(stop_at=6).losses
    # garble the global RNG as a fresh process would have it
    torch.manual_seed(123)
    np.random.seed(123)
    resumed = _trainer(tmp_path / "b", steps=10, resume=True)
    assert resumed.step == 4
    rest = resumed.fit().losses
    np.testing.assert_array_equal(np.array(first[:4] + rest), np.array(straight))
    assert first[4:6] == rest[:2]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_corrupt_latest_checkpoint_names_the_file_and_the_previous_one_loads(tmp_path: Path) -> None:
    _trainer(tmp_path, steps=8).fit()
    older, latest = checkpoint_dirs(tmp_path)
    weights = latest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(weights)) as err:
        _trainer(tmp_path, steps=8, resume=True)
    assert str(older) in str(err.value)
    trainer = _trainer(tmp_path, steps=8, resume=older)
    assert trainer.step == 4 and resolve_checkpoint(older) == older


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoints(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, steps=4)
    trainer.fit()

    def crash(directory: Path) -> None:
        (directory / "partial.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt

    trainer.save_extra = crash
    trainer.step = 5
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004"]
    assert resolve_checkpoint(tmp_path).name == "step-00000004"


def test_run_dir_guard(tmp_path: Path) -> None:
    config = {"model": {"dim": 16}, "train": {"steps": 10, "lr": 1e-3}}
    prepare_run_dir(tmp_path, config, resume=False, overwrite=False)
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_run_dir(tmp_path, config, resume=False, overwrite=False)
    other = {"model": {"dim": 32}, "train": {"steps": 10, "lr": 1e-3}}
    with pytest.raises(FileExistsError, match=r"different run \(model.dim: 16 -> 32"):
        prepare_run_dir(tmp_path, other, resume=False, overwrite=False)
    with pytest.raises(FileExistsError, match="cannot resume"):
        prepare_run_dir(tmp_path, other, resume=True, overwrite=False)
    with pytest.raises(FileExistsError, match=r"configuration \(model.dim: 16 -> 32\), which"):  # steps may change
        prepare_run_dir(
            tmp_path, {"model": {"dim": 32}, "train": {"steps": 20, "lr": 1e-3}}, resume=True, overwrite=False
        )
    longer = {"model": {"dim": 16}, "train": {"steps": 20, "lr": 1e-3}}
    prepare_run_dir(tmp_path, longer, resume=True, overwrite=False)
    assert json.loads((tmp_path / "run.json").read_text()) == longer  # the run's record, with the change
    prepare_run_dir(tmp_path, other, resume=False, overwrite=True)
    assert json.loads((tmp_path / "run.json").read_text()) == other
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "thesis.txt").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a run directory"):
        prepare_run_dir(stranger, config, resume=False, overwrite=True)
    assert (stranger / "thesis.txt").is_file()


def test_tensor_batches_and_metrics_fn(tmp_path: Path) -> None:
    # the vision-style path: no input_ids, a metrics function (accuracy), no perplexity
    seed_everything(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor):
            logits = self.fc(pixel_values)
            return type("Out", (), {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits})

    def accuracy(out, batch) -> dict[str, float]:
        return {"accuracy": (out.logits.argmax(-1) == batch["labels"]).float().mean().item()}

    config = TrainConfig(steps=40, lr=5e-2, warmup=0, perplexity=False, progress=False)
    val = [{"pixel_values": x, "labels": y}]
    batches = TensorBatches({"pixel_values": x, "labels": y}, batch_size=16)
    result = Trainer(Classifier(), batches, config, tmp_path, val_data=val, metrics_fn=accuracy).fit()
    assert result.eval["val_accuracy"] > 0.9 and "val_ppl" not in result.eval
    assert "samples_per_s" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_warmup_cosine_shape() -> None:
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=100, min_lr_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_unfinished_checkpoint_folders_are_removed_when_a_run_starts(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, steps=4)
    trainer.fit()

    def crash(directory: Path) -> None:
        (directory / "partial.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt

    trainer.save_extra, trainer.step = crash, 5
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    (tmp_path / "checkpoints" / ".old-step-00000004-1").mkdir()  # a replaced checkpoint not yet deleted
    assert len(list((tmp_path / "checkpoints").glob(".*"))) == 2
    _trainer(tmp_path, steps=6, resume=True)
    assert list((tmp_path / "checkpoints").glob(".*")) == []
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004"]


def test_a_trainer_state_that_unpickles_other_objects_is_named_with_what_to_do(tmp_path: Path) -> None:
    _trainer(tmp_path, steps=4).fit()
    ckpt = checkpoint_dirs(tmp_path)[-1]
    state = ckpt / "trainer_state.pt"
    torch.save({"step": 4, "note": Path("any object torch.load(weights_only=True) refuses")}, state)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["trainer_state.pt"] = {  # a consistent checkpoint: only the unpickler refuses it
        "bytes": state.stat().st_size,
        "sha256": hashlib.sha256(state.read_bytes()).hexdigest(),
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"{state}.*refused.*Path.*--overwrite"):
        _trainer(tmp_path, steps=6, resume=True)


@pytest.mark.parametrize(
    ("option", "value"), [("min_lr_ratio", 1.5), ("weight_decay", -0.1), ("grad_clip", -1.0), ("steps", 0)]
)
def test_train_config_refuses_options_that_cannot_work(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        TrainConfig(**{option: value})


def test_time_budget_fits_the_step_count_and_the_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a fake clock that only steps advance: the first costs 5 s (one-time setup), every later one 0.5 s, so a
    # 20 s budget holds 1 + (20 - 5) / 0.5 = 31 steps, whatever the first estimate (10) says
    import retentive.training.trainer as trainer_module

    now = [0.0]
    trainer = _trainer(tmp_path, steps=10, time_budget=20.0, ckpt_interval=0, eval_interval=0)
    real_step = trainer._train_step

    def timed_step():
        now[0] += 5.0 if trainer.step == 0 else 0.5
        return real_step()

    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(trainer, "_train_step", timed_step)
    result = trainer.fit()
    assert trainer.step == trainer.total_steps == 31 == len(result.losses)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-2 * 0.1)  # the cosine ended on the fitted step
    with pytest.raises(ValueError, match="time_budget"):
        TrainConfig(time_budget=0)


def test_activation_checkpointing_takes_the_same_steps(tmp_path: Path) -> None:
    """A RetNet with dropout, its blocks recomputed in every backward: the losses of the plain run, exactly."""
    from retentive import RetNetConfig, RetNetForCausalLM

    def run(name: str, **cfg) -> tuple[Trainer, list[float]]:
        seed_everything(0)
        model = RetNetForCausalLM(RetNetConfig(vocab_size=64, dim_model=16, num_layers=2, num_heads=2, dropout=0.1))
        config = TrainConfig(steps=5, lr=1e-2, warmup=1, ckpt_interval=0, progress=False, **cfg)
        trainer = Trainer(model, TokenWindows(_tokens(), seq_len=16, batch_size=4, seed=1), config, tmp_path / name)
        return trainer, trainer.fit().losses

    _, plain = run("plain")
    trainer, losses = run("checkpointed", activation_checkpointing=True)
    assert trainer.model.model.retnet.gradient_checkpointing
    np.testing.assert_array_equal(losses, plain)
    assert "activation_checkpointing" not in TrainConfig().to_dict()  # run.json as before the option existed


def test_activation_checkpointing_of_a_model_without_blocks_is_refused_naming_the_option(tmp_path: Path) -> None:
    config = TrainConfig(steps=1, activation_checkpointing=True, progress=False)
    with pytest.raises(ValueError, match=r"activation_checkpointing: TinyLM has neither .* train it with"):
        Trainer(TinyLM(), TokenWindows(_tokens(), seq_len=16, batch_size=4, seed=1), config, tmp_path)
