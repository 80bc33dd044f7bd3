"""Image classification data, offline: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` and
scikit-learn's bundled 8 x 8 digits.

Each split is an :class:`ImageData`: standardized float images (N, C, H, W) and int64 labels, which
yields ``{"pixel_values", "labels"}`` batches, the keyword arguments of every vision model here.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `dpkg -L dataset-fashion-mnist` puts it
FASHION_MNIST_ENV = "RETENTIVE_FASHION_MNIST"  # overrides the directory
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DATASETS = ("fashion-mnist", "digits")
SPLITS = ("train", "test")


@dataclass
class ImageData:
    """One split of an image classification dataset.

    Attributes:
        images: (N, C, H, W) float32, standardized with the training split's mean and std.
        labels: (N,) int64 in [0, num_classes).
        classes: the class names.
    """

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[dict[str, Tensor]]:
        """One pass over the split in batches of ``batch_size`` (the last one may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            yield {"pixel_values": self.images[index], "labels": self.labels[index]}


def load_images(name: str, split: str, root: str | os.PathLike | None = None) -> ImageData:
    """A split (``"train"`` or ``"test"``) of a dataset of ``DATASETS``; ``root`` overrides where Fashion-MNIST is."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "fashion-mnist":
        return fashion_mnist(split, root)
    if name == "digits":
        return digits(split)
    raise ValueError(f"unknown image dataset {name!r}; choose one of {DATASETS}")


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory of the four gzip idx files: ``root``, else $RETENTIVE_FASHION_MNIST, else Debian's path."""
    path = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {path}: install the Debian package with "
            f"`sudo apt-get install dataset-fashion-mnist`, or point ${FASHION_MNIST_ENV} (or root=) at a "
            "directory holding train-images-idx3-ubyte.gz and its three siblings"
        )
    return path


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip IDX file (the MNIST format): a big-endian header of dimensions, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} bytes of data but its header says {shape}")
    return array.reshape(shape)


def fashion_mnist(split: str, root: str | os.PathLike | None = None) -> ImageData:
    """Fashion-MNIST: 60,000 training and 10,000 test images, 1 x 28 x 28, ten classes."""
    path = fashion_mnist_dir(root)
    prefix = "train" if split == "train" else "t10k"
    images = torch.from_numpy(read_idx(path / f"{prefix}-images-idx3-ubyte.gz").copy())  # (N, 28, 28) uint8
    labels = torch.from_numpy(read_idx(path / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    mean, std = 0.2860, 0.3530  # of the training images scaled to [0, 1]
    return ImageData((images[:, None].float() / 255 - mean) / std, labels, FASHION_MNIST_CLASSES)


def digits(split: str, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's 1,797 digits, 1 x 8 x 8, ten classes; a fixed shuffle puts ``test_fraction`` in the test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 16  # (N, 1, 8, 8) in [0, 1]
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = round(test_fraction * len(labels))
    index = order[n_test:] if split == "train" else order[:n_test]
    train = images[order[n_test:]]
    images = (images[index] - train.mean()) / train.std()
    return ImageData(images, labels[index], tuple(str(d) for d in range(10)))
