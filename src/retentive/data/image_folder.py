"""An ImageNet-style folder of images: ``train/<class>/*.jpg|png`` and ``val/<class>/*.jpg|png``.

:func:`index_image_folder` lists it (the classes are the sorted subfolders of ``train/``); :class:`FolderBatches`
gives the trainer its training batches, decoded with PIL and augmented by a callable (see
:mod:`retentive.data.augment`), each a pure function of the seed and the position in the data, so a resumed run
sees the batches of an uninterrupted one; :class:`FolderEval` gives the evaluation batches, preprocessed as at
inference (:class:`~retentive.models.image_processing.ResizeCropImageProcessor`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .sampler import IndexSampler

if TYPE_CHECKING:
    from ..models.image_processing import ResizeCropImageProcessor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = "an image folder holds train/<class>/*.jpg|png and val/<class>/*.jpg|png"
DECODE_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes and resizes without the GIL

Sample = tuple[Path, int]  # an image file and its class index
Augment = Callable[[list[Tensor], Tensor], tuple[Tensor, Tensor]]


@dataclass
class ImageFolder:
    """The index of an image folder.

    Attributes:
        root: the folder.
        classes: the class names, the sorted subfolders of ``train/``; a label is an index into them.
        train, val: (image file, label) of every image of the split, in sorted order.
    """

    root: Path
    classes: tuple[str, ...]
    train: list[Sample]
    val: list[Sample]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (its subfolders too), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _split(root: Path, split: str) -> dict[str, list[Path]]:
    """Class name -> its image files, for the split folder ``root/split``."""
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: {LAYOUT}")
    classes = {d.name: _images(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not classes:
        raise ValueError(f"{folder} has no class folders: {LAYOUT}")
    if not any(classes.values()):
        raise ValueError(f"{folder} holds no {'/'.join(IMAGE_SUFFIXES)} image: {LAYOUT}")
    return classes


def index_image_folder(root: str | os.PathLike) -> ImageFolder:
    """List the images of an ImageNet-style folder.

    Raises:
        FileNotFoundError: ``root``, ``root/train`` or ``root/val`` does not exist.
        ValueError: naming the folder: a split without class folders or images, a class of ``train/`` without
            images, or a class of ``val/`` that ``train/`` lacks.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist: {LAYOUT} (or give fashion-mnist or digits)")
    train, val = _split(root, "train"), _split(root, "val")
    for name, files in train.items():
        if not files:
            raise ValueError(f"{root / 'train' / name} holds no image: add some, or remove the class folder")
    unknown = sorted(set(val) - set(train))
    if unknown:
        raise ValueError(
            f"{root / 'val' / unknown[0]} is a class that {root / 'train'} lacks ({len(unknown)} such): the classes "
            "are train/'s folders, so every class of val/ needs training images"
        )
    classes = tuple(train)
    label = {name: i for i, name in enumerate(classes)}
    return ImageFolder(
        root,
        classes,
        [(f, label[name]) for name, files in train.items() for f in files],
        [(f, label[name]) for name, files in val.items() for f in files],
    )


def open_rgb(path: Path) -> Image.Image:
    """The image at ``path``, decoded, as RGB (grayscale and palette images too)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def read_image(path: Path) -> Tensor:
    """The image at ``path`` as uint8 (3, H, W)."""
    return torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1)


def _map(fn: Callable[[Path], Any], paths: list[Path], threads: int) -> list[Any]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, paths))


class FolderBatches:
    """The trainer's training batches from an image folder: ``{"pixel_values", "labels"}`` as ``augment`` makes them.

    Batch k is a function of (seed, rank, k) alone: its images come from an :class:`IndexSampler` and ``augment``
    draws its randomness from torch's generators seeded for this batch (and restored afterwards), so the state is
    the sampler's position and a resumed run gets the very batches of an uninterrupted one.

    Args:
        samples: (image file, label) of the training images.
        augment: ``augment(images, labels)``: the uint8 images (3, H_i, W_i) and their labels (B,) -> pixel values
            (B, C, S, S) and targets, on ``device`` (e.g. :class:`retentive.data.augment.TrainAugment`).
        batch_size, seed, rank, world_size: as :class:`IndexSampler`.
        device: where the labels go before ``augment`` (the model's device).
        threads: threads decoding the images.
    """

    def __init__(
        self,
        samples: list[Sample],
        augment: Augment,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        threads: int = DECODE_THREADS,
    ) -> None:
        self.samples, self.augment, self.device, self.threads = samples, augment, torch.device(device), threads
        self.sampler = IndexSampler(len(samples), batch_size, seed, rank, world_size)

    def _batch_seed(self) -> int:
        """The seed of the next batch, from (seed, rank, position)."""
        key = [self.sampler.seed, self.sampler.rank, self.sampler.position]
        return int(np.random.default_rng(key).integers(2**63))

    def next_batch(self) -> dict[str, Tensor]:
        seed = self._batch_seed()
        index = self.sampler.next_indices()
        images = _map(read_image, [self.samples[i][0] for i in index], self.threads)
        labels = torch.tensor([self.samples[i][1] for i in index], device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            pixel_values, targets = self.augment(images, labels)
        return {"pixel_values": pixel_values, "labels": targets}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class FolderEval:
    """Evaluation batches ``{"pixel_values", "labels"}`` (labels (B,) int64) from an image folder's images, each
    preprocessed by ``processor.transform``; re-iterable, decoded anew at every pass. Under ``torchrun`` each
    process takes every ``world_size``-th image.

    Args:
        samples: (image file, label) of the evaluation images.
        processor: the preprocessing (resize, centre crop, standardize) of inference.
        batch_size: images per batch (the last batch may be smaller).
        rank, world_size: this process and the number of processes.
        threads: threads decoding and resizing the images.
    """

    def __init__(
        self,
        samples: list[Sample],
        processor: ResizeCropImageProcessor,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        threads: int = DECODE_THREADS,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples, self.processor = samples[rank::world_size], processor
        self.batch_size, self.threads = batch_size, threads

    def _transform(self, path: Path) -> Tensor:
        return self.processor.transform(open_rgb(path))

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for start in range(0, len(self.samples), self.batch_size):
            batch = self.samples[start : start + self.batch_size]
            images = _map(self._transform, [path for path, _ in batch], self.threads)
            yield {"pixel_values": torch.stack(images), "labels": torch.tensor([label for _, label in batch])}
