"""Offline image data: Fashion-MNIST from the Debian package, scikit-learn's digits, the IDX reader."""

import gzip
import struct

import numpy as np
import pytest
import torch

from retentive.data.images import fashion_mnist_dir, load_images, read_idx


def test_fashion_mnist_splits():
    try:
        fashion_mnist_dir()
    except FileNotFoundError:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    train, test = load_images("fashion-mnist", "train"), load_images("fashion-mnist", "test")
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert abs(train.images.mean().item()) < 0.01 and abs(train.images.std().item() - 1) < 0.01
    assert train.num_classes == 10 and train.classes[9] == "Ankle boot" and train.image_size == (28, 28)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_images("fashion-mnist", "test", root=tmp_path)


def test_fashion_mnist_root_override_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + images.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    test = load_images("fashion-mnist", "test", root=tmp_path)
    assert test.labels.tolist() == labels.tolist()
    torch.testing.assert_close(test.images[:, 0] * 0.3530 + 0.2860, torch.from_numpy(images).float() / 255)


def test_digits_split_is_fixed_and_disjoint():
    train, test = load_images("digits", "train"), load_images("digits", "test")
    assert len(train) + len(test) == 1797 and train.image_size == (8, 8)
    again = load_images("digits", "test")
    torch.testing.assert_close(again.images, test.images)
    flat = {tuple(x.flatten().tolist()) for x in train.images}
    assert sum(tuple(x.flatten().tolist()) in flat for x in test.images) < 0.05 * len(test)  # a few duplicates exist


def test_batches_cover_the_split_once():
    test = load_images("digits", "test")
    seen = torch.cat([b["labels"] for b in test.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(test.labels.tolist())
    first = next(test.batches(10))
    assert first["pixel_values"].shape == (10, 1, 8, 8)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="cifar"):
        load_images("cifar", "train")
    with pytest.raises(ValueError, match="split"):
        load_images("digits", "validation")
