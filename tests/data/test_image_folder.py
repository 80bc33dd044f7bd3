"""The image-folder index (classes, counts, the errors naming the path) and its evaluation batches."""

import numpy as np
import pytest
import torch
from imagefolder import make_image_folder
from PIL import Image

from retentive.data import FolderEval, index_image_folder
from retentive.models.image_processing import ResizeCropImageProcessor


def test_index_lists_classes_and_images(tmp_path):
    root = make_image_folder(tmp_path, classes=3, train=5, val=2)
    (root / "train" / "class1" / "notes.txt").write_text("not an image")
    Image.new("L", (12, 9)).save(root / "train" / "class1" / "extra.JPG")  # suffixes in any case
    folder = index_image_folder(root)
    assert folder.classes == ("class0", "class1", "class2") and folder.num_classes == 3
    assert [sum(label == c for _, label in folder.train) for c in range(3)] == [5, 6, 5]
    assert [sum(label == c for _, label in folder.val) for c in range(3)] == [2, 2, 2]
    assert all(path.parent.name == f"class{label}" for path, label in folder.train + folder.val)


def test_val_may_lack_a_class(tmp_path):
    root = make_image_folder(tmp_path, classes=3, train=2, val=1)
    for f in (root / "val" / "class2").iterdir():
        f.unlink()
    (root / "val" / "class2").rmdir()
    folder = index_image_folder(root)
    assert folder.num_classes == 3 and {label for _, label in folder.val} == {0, 1}


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda root: root / "nowhere", FileNotFoundError, r"image folder .*nowhere does not exist"),
        (lambda root: _remove(root / "train"), FileNotFoundError, r"train is missing: an image folder holds"),
        (lambda root: _remove(root / "val"), FileNotFoundError, r"val is missing"),
        (lambda root: _empty(root / "train" / "class1"), ValueError, r"train/class1 holds no image"),
        (lambda root: _empty_split(root / "val"), ValueError, r"val holds no \.jpg/\.jpeg/\.png image"),
        (lambda root: _only_files(root / "train"), ValueError, r"train has no class folders"),
        (lambda root: _new_class(root / "val" / "zebra"), ValueError, r"val/zebra is a class that .*train lacks"),
    ],
)
def test_bad_folders_are_refused_naming_the_path(tmp_path, damage, error, match):
    root = make_image_folder(tmp_path / "data", classes=2, train=2, val=1)
    with pytest.raises(error, match=match):
        index_image_folder(damage(root) or root)


def _remove(folder):
    for f in folder.rglob("*.png"):
        f.unlink()
    for d in sorted(folder.iterdir()):
        d.rmdir()
    folder.rmdir()


def _empty(folder):
    for f in folder.iterdir():
        f.unlink()


def _empty_split(split):
    for d in split.iterdir():
        _empty(d)


def _only_files(split):
    _remove(split)
    split.mkdir()
    Image.new("RGB", (8, 8)).save(split / "loose.png")


def _new_class(folder):
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "0.png")


def test_eval_batches_are_the_inference_preprocessing(tmp_path):
    """Each evaluation image is ResizeCropImageProcessor's output for it, in the index's order, batched."""
    root = make_image_folder(tmp_path, classes=2, train=1, val=3)
    Image.fromarray(np.full((20, 30), 90, np.uint8), mode="L").save(root / "val" / "class1" / "gray.png")
    folder = index_image_folder(root)
    processor = ResizeCropImageProcessor(crop_size=16)
    batches = list(FolderEval(folder.val, processor, batch_size=4, threads=2))
    assert [len(b["labels"]) for b in batches] == [4, 3]
    pixels, labels = torch.cat([b["pixel_values"] for b in batches]), torch.cat([b["labels"] for b in batches])
    expected = processor([Image.open(path) for path, _ in folder.val])["pixel_values"]
    assert pixels.shape == (7, 3, 16, 16) and torch.equal(pixels, expected)
    assert labels.tolist() == [label for _, label in folder.val] and labels.dtype == torch.int64
    assert torch.equal(torch.cat([b["pixel_values"] for b in FolderEval(folder.val, processor, 7)]), pixels)
    halves = [FolderEval(folder.val, processor, 2, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(label for h in halves for b in h for label in b["labels"].tolist()) == sorted(labels.tolist())
