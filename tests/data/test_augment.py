"""The image folder's training augmentations (Kornia): RandAugment's notation, soft targets that match the mixed
pixels, batches that are augmented and a function of the seed and the position alone."""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from imagefolder import make_image_folder

from retentive.data import FolderBatches, FolderEval, IndexSampler, index_image_folder
from retentive.data.augment import TrainAugment, parse_rand_augment
from retentive.models.image_processing import ResizeCropImageProcessor


def test_rand_augment_notation():
    assert parse_rand_augment("m9-n2") == (2, 9.0)
    assert parse_rand_augment("rand-n3-m5.5") == (3, 5.5)
    assert parse_rand_augment("none") is None
    for bad in ("m9", "n2", "m10-n2", "m0-n2", "m9-n0", "m9-n16", "m9-n1.5", "m9-n2-mstd0.5", "m9-m8", "mx-n2", ""):
        with pytest.raises(ValueError, match=r"--rand-augment\) must be m<M>-n<N>"):
            parse_rand_augment(bad)


def test_bad_options_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"\(--mixup, --cutmix\) .* got 0.6 and 0.5"):
        TrainAugment(16, 3, mixup=0.6, cutmix=0.5)
    with pytest.raises(ValueError, match=r"--label-smoothing"):
        TrainAugment(16, 3, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"--image-size"):
        TrainAugment(0, 3)


def constant_images(n: int, side: int = 12) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Image i is one grey level c_i of its own (differing sizes), its label i: mixing shows in the pixel values."""
    levels = torch.linspace(10, 250, n).round().to(torch.uint8)
    return [torch.full((3, side + i, side), int(c), dtype=torch.uint8) for i, c in enumerate(levels)], levels


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "none"])
def test_targets_are_the_shares_of_the_mixed_images(mix):
    """With image i one grey level c_i and label i, every pixel mean equals targets @ c (MixUp: every pixel), each
    row of targets sums to 1, and unmixed targets are one-hot."""
    images, levels = constant_images(8)
    shares = {"mixup": (1.0, 0.0), "cutmix": (0.0, 1.0), "none": (0.0, 0.0)}[mix]
    augment = TrainAugment(12, 8, None, *shares, label_smoothing=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    x, targets = augment(images, torch.arange(8))
    assert x.shape == (8, 3, 12, 12) and targets.shape == (8, 8)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    grey = levels.float() / 255
    torch.testing.assert_close(x.mean((1, 2, 3)), targets @ grey)
    if mix == "mixup":
        torch.testing.assert_close(x, (targets @ grey).view(8, 1, 1, 1).expand_as(x))
    if mix == "none":
        assert torch.equal(targets, torch.eye(8))
    else:
        assert (targets.diagonal() < 1).sum() >= 4, "most images are mixed with another"


def test_label_smoothing_is_cross_entropys():
    images, _ = constant_images(6)
    labels = torch.tensor([0, 3, 1, 4, 4, 2])
    _, targets = TrainAugment(12, 5, None, 0.0, 0.0, label_smoothing=0.1)(images, labels)
    logits = torch.randn(6, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    torch.testing.assert_close(F.cross_entropy(logits, targets), F.cross_entropy(logits, labels, label_smoothing=0.1))
    smoothed = TrainAugment(12, 5, None, 1.0, 0.0, label_smoothing=0.1)(images, labels)[1]
    torch.testing.assert_close(smoothed.sum(1), torch.ones(6))
    assert smoothed.min() >= 0.1 / 5 - 1e-6


def test_batches_are_augmented_and_a_function_of_seed_and_position(tmp_path):
    folder = index_image_folder(make_image_folder(tmp_path, classes=3, train=4, val=1))
    augment = TrainAugment(16, 3)  # the folder defaults: RandAugment m9-n2, MixUp or CutMix, smoothing 0.1

    def batches(seed, n, state=None):
        source = FolderBatches(folder.train, augment, batch_size=6, seed=seed, threads=2)
        if state is not None:
            source.load_state_dict(state)
        return [source.next_batch() for _ in range(n)], source.state_dict()

    rng = torch.get_rng_state()
    (first, second), _ = batches(0, 2)
    assert torch.equal(torch.get_rng_state(), rng), "the global generator is left as it was"
    again, state = batches(0, 1)
    assert torch.equal(again[0]["pixel_values"], first["pixel_values"])
    assert torch.equal(again[0]["labels"], first["labels"])
    resumed, _ = batches(0, 1, state)
    assert torch.equal(resumed[0]["pixel_values"], second["pixel_values"])
    assert not torch.equal(batches(1, 1)[0][0]["pixel_values"], first["pixel_values"])
    assert first["pixel_values"].shape == (6, 3, 16, 16) and first["labels"].shape == (6, 3)
    torch.testing.assert_close(first["labels"].sum(1), torch.ones(6))
    # the same images as the evaluation preprocesses them: the training batch is not that
    index = IndexSampler(len(folder.train), 6, seed=0).next_indices()
    plain = next(iter(FolderEval([folder.train[i] for i in index], ResizeCropImageProcessor(crop_size=16), 6)))
    assert (first["pixel_values"] - plain["pixel_values"]).abs().mean() > 0.1


def test_without_kornia_the_error_says_what_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "retentive.data.augment")
    for name in [m for m in sys.modules if m == "kornia" or m.startswith("kornia.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "kornia", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs Kornia .*pip install 'retentive\[vision\]'"):
        importlib.import_module("retentive.data.augment")
