"""train-vision on an image folder: it learns, resumes exactly (the weights and their moving average), runs from
the command line with the folder's options, and the built-in datasets refuse them."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from imagefolder import make_image_folder
from safetensors.torch import load_file

from retentive.cli import main
from retentive.training import TrainConfig
from retentive.training.vision import VisionConfig, build_vision_model, train_vision


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), classes=3, train=8, val=4)


def vision(folder, **kw):
    return VisionConfig(**{"model": "vir-tiny", "data": str(folder), "batch_size": 6, "epochs": None,
                           "image_size": 16, "eval_batch_size": 6, **kw})  # fmt: skip


def config(**kw):
    return TrainConfig(**{"steps": 4, "warmup": 1, "eval_interval": 2, "ckpt_interval": 2, "ema_decay": 0.5,
                          "progress": False, **kw})  # fmt: skip


def test_folder_defaults_are_timms_recipe(folder):
    v = VisionConfig(data=str(folder))
    assert (v.image_size, v.rand_augment, v.mixup, v.cutmix, v.label_smoothing) == (224, "m9-n2", 0.5, 0.5, 0.1)
    assert v.to_dict()["data"] == str(folder.resolve())
    assert "image_size" not in VisionConfig(data="digits").to_dict(), "run.json as before, so older runs resume"
    with pytest.raises(ValueError, match=r"mixup \(--mixup\) belongs to an image folder .*not to digits"):
        VisionConfig(data="digits", mixup=0.2)


def test_resume_gives_the_weights_and_average_of_an_uninterrupted_run(folder, tmp_path):
    straight = train_vision(vision(folder), config(), tmp_path / "a")
    assert straight.trainer.step == 4 and straight.ema is not None
    assert {"val_accuracy", "val_ema_accuracy", "val_loss", "val_ema_loss"} == straight.result.eval.keys()
    train_vision(vision(folder), config(), tmp_path / "b", stop_at=3)  # dies after step 3: step 2 is saved
    torch.manual_seed(123)  # a fresh process's generators
    resumed = train_vision(vision(folder), config(), tmp_path / "b", resume=True)
    assert resumed.trainer.resumed_from.name == "step-00000002"
    assert resumed.result.losses == straight.result.losses[2:]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints" / "step-00000004" / name) for run in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed.result.eval == straight.result.eval


def test_it_learns_the_classes(folder, tmp_path):
    """Plain crops (no RandAugment, no mixing): the classes' colours are learnt in a few steps."""
    plain = vision(folder, model="rmt-tiny", rand_augment="none", mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    run = train_vision(plain, config(steps=12, lr=3e-3, eval_interval=12, ckpt_interval=0), tmp_path)
    assert run.result.eval["val_accuracy"] > 0.5  # chance: 1/3
    assert run.result.eval["val_loss"] < 0.75 * math.log(3)  # chance: log 3


@pytest.mark.parametrize("model", ["vir-tiny", "rmt-tiny", "vit-tiny"])
def test_every_model_takes_soft_targets(model):
    """The loss against class probabilities (MixUp's targets) and indices is cross-entropy, the ViT baseline's too
    (transformers' own loss would take probabilities for multi-label targets)."""
    net = build_vision_model(model, 3, (16, 16), 3).eval()
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 2, 1, 2])
    soft = torch.softmax(torch.randn(4, 3), -1)
    with torch.no_grad():
        out, hard = net(pixel_values=x, labels=soft), net(pixel_values=x, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, soft))
    torch.testing.assert_close(hard.loss, F.cross_entropy(hard.logits, labels))


def test_command_line(folder, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train-vision", "--model", "vir-tiny", "--data", str(folder), "--steps", "2", "--image-size", "16",
          "--batch-size", "6", "--eval-batch-size", "12", "--warmup", "1", "--rand-augment", "m5-n1",
          "--mixup", "0.3", "--ema-decay", "0.9", "--out", str(out), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "on " + str(folder.resolve()) + ": val accuracy" in printed and "(EMA " in printed
    stored = json.loads((out / "run.json").read_text())
    assert stored["vision"] | {"data": None} == stored["vision"] | {
        "data": None, "image_size": 16, "rand_augment": "m5-n1", "mixup": 0.3, "cutmix": 0.5, "label_smoothing": 0.1
    }  # fmt: skip
    assert stored["train"]["ema_decay"] == 0.9
    main(["train-vision", "--out", str(out), "--resume", "--steps", "3"])
    assert (out / "checkpoints" / "step-00000003" / "ema.safetensors").is_file()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--data", "digits", "--image-size", "16"], r"image_size \(--image-size\) belongs to an image folder"),
        (["--rand-augment", "m9"], r"--rand-augment\) must be m<M>-n<N>"),
        (["--mixup", "0.8", "--cutmix", "1.0"], r"\(--mixup, --cutmix\) are shares of the batches"),
        (["--ema-decay", "1"], r"ema_decay must lie in \[0, 1\)"),
    ],
)
def test_command_line_refuses_options_that_cannot_work(folder, tmp_path, options, match):
    argv = ["train-vision", "--data", str(folder), "--steps", "1", "--out", str(tmp_path / "run"), *options]
    with pytest.raises(SystemExit, match=match):
        main(argv)
    assert not (tmp_path / "run").exists(), "refused before anything is written"


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"image folder .*nowhere does not exist"):
        main(["train-vision", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
