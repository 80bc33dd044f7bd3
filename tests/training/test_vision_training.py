"""train-vision: ViR, RMT and the ViT baseline train with the shared trainer; checkpoints, resume, log, plot."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from retentive.cli import main
from retentive.data import ImageData, load_images
from retentive.training import TrainConfig
from retentive.training.vision import VisionConfig, build_vision_model, train_vision


@pytest.fixture(scope="module")
def digits():
    test = load_images("digits", "test")
    return load_images("digits", "train"), ImageData(test.images[:64], test.labels[:64], test.classes)


def config(**kw):
    return TrainConfig(**{"steps": 4, "warmup": 1, "eval_interval": 2, "ckpt_interval": 0, "progress": False, **kw})


@pytest.mark.parametrize("model", ["vir-tiny", "rmt-tiny", "vit-tiny"])
def test_every_model_trains_and_reports_accuracy(model, digits, tmp_path):
    vision = VisionConfig(model=model, data="digits", batch_size=32, epochs=None)
    run = train_vision(vision, config(), tmp_path, stop_at=2, train_split=digits[0], test_split=digits[1])
    assert 0 <= run.result.eval["val_accuracy"] <= 1 and "val_ppl" not in run.result.eval
    assert run.trainer.step == 2
    assert all(torch.isfinite(torch.tensor(run.result.losses)))


def test_resume_continues_the_same_run(digits, tmp_path):
    vision = VisionConfig(model="rmt-tiny", data="digits", batch_size=16, epochs=None)
    kw = {"train_split": digits[0], "test_split": digits[1]}
    train_vision(vision, config(ckpt_interval=2), tmp_path, stop_at=2, **kw)
    resumed = train_vision(vision, config(ckpt_interval=2), tmp_path, resume=True, **kw)
    assert resumed.trainer.resumed_from.name == "step-00000002" and resumed.trainer.step == 4
    straight = train_vision(vision, config(ckpt_interval=2), tmp_path / "straight", **kw)
    torch.testing.assert_close(resumed.result.losses, straight.result.losses[2:])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_accuracy" in r] == [2, 4]
    assert (tmp_path / "loss.png").is_file()
    with pytest.raises(FileExistsError, match="--resume"):
        train_vision(vision, config(ckpt_interval=2), tmp_path, **kw)


def test_models_are_shaped_for_the_data():
    vir = build_vision_model("vir-tiny", 1, (8, 8), 10)
    assert vir.config.patch_size == 2 and vir.config.image_size == 8
    vit = build_vision_model("vit-tiny", 1, (28, 28), 10)
    assert vit.config.patch_size == 7 and vit.config.hidden_size == vir.config.dim
    n_vir = sum(p.numel() for p in build_vision_model("vir-tiny", 1, (28, 28), 10).parameters())
    n_vit = sum(p.numel() for p in vit.parameters())
    assert abs(n_vir - n_vit) / n_vit < 0.01, "the baseline has the same size"
    assert build_vision_model("rmt-tiny", 3, (9, 13), 4)(torch.randn(2, 3, 9, 13)).logits.shape == (2, 4)
    with pytest.raises(ValueError, match="square"):
        build_vision_model("vir-tiny", 1, (8, 12), 10)
    with pytest.raises(ValueError, match="unknown vision model"):
        build_vision_model("resnet", 1, (8, 8), 10)


def test_command_line(tmp_path, capsys):
    main(["train-vision", "--model", "rmt-tiny", "--data", "digits", "--steps", "2", "--batch-size", "16",
          "--warmup", "1", "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert "rmt-tiny (" in out and "on digits: test accuracy" in out and (tmp_path / "checkpoints").is_dir()


def test_command_line_resume_continues_the_run_as_configured(tmp_path, capsys):
    """`train-vision --out DIR --resume` takes the run's own options (not the defaults) and continues it exactly,
    its blocks' activations recomputed or not."""
    main(["train-vision", "--model", "rmt-tiny", "--data", "digits", "--steps", "4", "--batch-size", "16",
          "--warmup", "1", "--ckpt-interval", "2", "--eval-interval", "2", "--out", str(tmp_path / "a"),
          "--no-progress"])  # fmt: skip
    crashed = tmp_path / "b"  # as a crash after the step-2 checkpoint leaves the run
    shutil.copytree(tmp_path / "a", crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-00000004")
    main(["train-vision", "--out", str(crashed), "--resume", "--activation-checkpointing"])
    assert "rmt-tiny (" in capsys.readouterr().out.splitlines()[-2]
    final = "checkpoints/step-00000004/model.safetensors"
    straight, resumed = load_file(tmp_path / "a" / final), load_file(crashed / final)
    assert all(torch.equal(resumed[name], w) for name, w in straight.items())
    assert json.loads((crashed / "run.json").read_text())["train"]["activation_checkpointing"] is True
    with pytest.raises(SystemExit, match=r"cannot resume: .* \(vision.batch_size: 16 -> 32\), which"):
        main(["train-vision", "--out", str(crashed), "--resume", "--batch-size", "32", "--steps", "6"])
    main(["train-vision", "--out", str(crashed), "--resume", "--steps", "6", "--eval-batch-size", "100",
          "--no-activation-checkpointing"])  # fmt: skip
    assert (crashed / "checkpoints" / "step-00000006").is_dir()
    assert not json.loads((crashed / "run.json").read_text())["train"].get("activation_checkpointing")


def test_epochs_set_the_steps(digits, tmp_path):
    run = train_vision(VisionConfig(model="rmt-tiny", data="digits", batch_size=500, epochs=2), config(), tmp_path,
                       stop_at=1, train_split=digits[0], test_split=digits[1])  # fmt: skip
    assert run.trainer.config.steps == 6  # ceil(2 * 1438 / 500)
