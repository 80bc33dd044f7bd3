"""The image-classification recipe: an offline dataset or an image folder -> ViR, RMT or the ViT baseline ->
:class:`Trainer`.

:func:`train_vision` is what ``retentive train-vision`` runs: the same trainer as the language model
(progress bar, ``metrics.jsonl`` + ``loss.png``, atomic checkpoints, exact resume, a moving average of the weights
if asked), with test accuracy as the evaluation metric. An ImageNet-style folder (``train/<class>/``,
``val/<class>/``) trains with the parts of timm's recipe (:class:`~retentive.data.augment.TrainAugment`: random
resized crops, RandAugment, MixUp or CutMix, label smoothing) and is evaluated as at inference
(:class:`~retentive.models.image_processing.ResizeCropImageProcessor`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..data import (
    IMAGE_DATASETS,
    FolderBatches,
    FolderEval,
    ImageData,
    ImageFolder,
    TensorBatches,
    index_image_folder,
    load_images,
)
from ..models import (
    RMT_PRESETS,
    VIR_PRESETS,
    RMTConfig,
    RMTForImageClassification,
    ViRConfig,
    ViRForImageClassification,
)
from ..models.image_processing import ResizeCropImageProcessor
from ..models.vit import vit_like
from .checkpoint import check_run_dir, prepare_run_dir
from .distributed import DistInfo, barrier, init_distributed
from .trainer import TrainConfig, Trainer, TrainResult, seed_everything

if TYPE_CHECKING:
    from ..data.augment import TrainAugment  # needs Kornia, imported where an image folder is trained

logger = logging.getLogger(__name__)

BASELINES = {"vit-tiny": "vir-tiny", "vit-tiny-32": "vir-tiny-32"}  # a ViT shaped like this ViR preset
VISION_MODELS = tuple(sorted(VIR_PRESETS)) + tuple(sorted(RMT_PRESETS)) + tuple(BASELINES)
# An image folder's recipe when its options are left out: DeiT's ImageNet recipe in timm (RandAugment m9 with two
# operations, MixUp or CutMix on every batch, half each, label smoothing 0.1), at ImageNet's resolution.
FOLDER_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "rand_augment": "m9-n2",
    "mixup": 0.5,
    "cutmix": 0.5,
    "label_smoothing": 0.1,
}


@dataclass
class VisionConfig:
    """What the run trains and on what (the trainer's options are in :class:`TrainConfig`).

    The fields of ``FOLDER_DEFAULTS`` belong to an image folder: None takes their default there, and they are
    refused (not None) for the built-in datasets.
    """

    model: str = "vir-tiny"  # a ViR or RMT preset, or a ViT baseline ("vit-tiny")
    data: str = "fashion-mnist"  # "fashion-mnist", "digits", or an image folder (train/<class>/, val/<class>/)
    data_root: str | None = None  # where Fashion-MNIST's idx files are (default: the Debian package's path)
    batch_size: int = 128
    epochs: float | None = 3.0  # passes over the training set; sets the trainer's steps (None: keep them)
    eval_batch_size: int = 500
    seed: int = 0
    image_size: int | None = None  # an image folder's: the side of the square crops the model sees
    rand_augment: str | None = None  # an image folder's: RandAugment, "m9-n2" (timm's notation) or "none"
    mixup: float | None = None  # an image folder's: the share of batches mixed by MixUp
    cutmix: float | None = None  # an image folder's: the share of batches mixed by CutMix (mixup + cutmix <= 1)
    label_smoothing: float | None = None  # an image folder's: ε of the targets

    def __post_init__(self) -> None:
        for name, default in FOLDER_DEFAULTS.items():
            value = getattr(self, name)
            if self.is_folder and value is None:
                setattr(self, name, default)
            elif not self.is_folder and value is not None:
                raise ValueError(
                    f"{name} (--{name.replace('_', '-')}) belongs to an image folder (--data path/), not to {self.data}"
                )

    @property
    def is_folder(self) -> bool:
        """Whether ``data`` names an image folder rather than a built-in dataset."""
        return self.data not in IMAGE_DATASETS

    def train_augment(self, num_classes: int) -> TrainAugment:
        """An image folder's training augmentations.

        Raises:
            ValueError: naming the option that cannot work.
            ModuleNotFoundError: Kornia is not installed.
        """
        from ..data.augment import TrainAugment, parse_rand_augment

        rand_augment = parse_rand_augment(self.rand_augment)
        return TrainAugment(self.image_size, num_classes, rand_augment, self.mixup, self.cutmix, self.label_smoothing)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.is_folder:
            d["data"] = str(Path(self.data).expanduser().resolve())
        else:  # run.json as before image folders existed, so older runs resume
            for name in FOLDER_DEFAULTS:
                del d[name]
        return d


@dataclass
class VisionRun:
    model: nn.Module
    result: TrainResult
    trainer: Trainer
    ema: nn.Module | None = None  # the moving average of the weights (TrainConfig.ema_decay)


def _patch_size(preferred: int, side: int) -> int:
    """``preferred`` if it cuts ``side`` into at least 4 patches, else the largest divisor of side that does."""
    if side % preferred == 0 and side // preferred >= 4:
        return preferred
    return max(p for p in range(1, side // 4 + 1) if side % p == 0)


def build_vision_model(name: str, channels: int, image_size: tuple[int, int], num_classes: int) -> nn.Module:
    """The model ``name`` shaped for images (channels, height, width) and ``num_classes`` classes."""
    if name in RMT_PRESETS:
        cfg = RMTConfig.from_preset(name, in_channels=channels, num_classes=num_classes, image_size=max(image_size))
        return RMTForImageClassification(cfg)
    if name not in VIR_PRESETS and name not in BASELINES:
        raise ValueError(f"unknown vision model {name!r}; choose one of {VISION_MODELS}")
    height, width = image_size
    if height != width:
        raise ValueError(f"ViR and ViT need square images, got {height} x {width}: use an RMT model")
    preset = BASELINES.get(name, name)
    patch_size = _patch_size(ViRConfig.from_preset(preset).patch_size, height)
    cfg = ViRConfig.from_preset(
        preset, image_size=height, patch_size=patch_size, in_channels=channels, num_classes=num_classes
    )
    return vit_like(cfg) if name in BASELINES else ViRForImageClassification(cfg)


def accuracy(output: Any, batch: dict[str, Tensor]) -> dict[str, float]:
    """Top-1 accuracy of a batch, the trainer's evaluation metric."""
    return {"accuracy": (output.logits.argmax(-1) == batch["labels"]).float().mean().item()}


def steps_for_epochs(epochs: float, train_size: int, batch_size: int) -> int:
    """Optimizer steps that make ``epochs`` passes over ``train_size`` examples."""
    return max(1, math.ceil(epochs * train_size / batch_size))


def _folder_data(
    vision: VisionConfig, folder: ImageFolder, augment: TrainAugment, dist: DistInfo
) -> tuple[FolderBatches, FolderEval]:
    """An image folder's training batches (augmented on the model's device) and evaluation batches."""
    data = FolderBatches(folder.train, augment, vision.batch_size, vision.seed, dist.rank, dist.world_size, dist.device)
    processor = ResizeCropImageProcessor(crop_size=vision.image_size)
    return data, FolderEval(folder.val, processor, vision.eval_batch_size, dist.rank, dist.world_size)


def train_vision(
    vision: VisionConfig,
    train: TrainConfig,
    run_dir: str | Path,
    resume: bool | str = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    train_split: ImageData | None = None,
    test_split: ImageData | None = None,
) -> VisionRun:
    """Train an image classifier and evaluate its test (an image folder: validation) accuracy.

    Args:
        vision: model and data options.
        train: the trainer's options (``steps`` comes from ``vision.epochs`` unless that is None; ``perplexity``
            is ignored: classifiers report accuracy).
        run_dir: the run directory (refused if it holds a different run, unless ``resume`` or ``overwrite``).
        resume: continue the run in ``run_dir`` (True) or from this checkpoint folder.
        overwrite: start afresh, deleting what ``run_dir`` holds.
        stop_at: stop after this step (see :meth:`Trainer.fit`).
        train_split, test_split: a built-in dataset already loaded (default: ``load_images(vision.data, ...)``).
    """
    if vision.is_folder:
        folder = index_image_folder(vision.data)
        augment = vision.train_augment(folder.num_classes)  # checks its options before anything is written
        train_size = len(folder.train)
    else:
        train_split = train_split or load_images(vision.data, "train", vision.data_root)
        test_split = test_split or load_images(vision.data, "test", vision.data_root)
        train_size = len(train_split)
    epochs = vision.epochs
    steps = train.steps if epochs is None else steps_for_epochs(epochs, train_size, vision.batch_size)
    train = replace(train, steps=steps, perplexity=False)
    run_config = {"vision": vision.to_dict(), "train": train.to_dict()}
    check_run_dir(run_dir, run_config, bool(resume), overwrite)  # every process, before the group forms (see lm.py)
    dist = init_distributed(train.device)
    if dist.is_main:
        prepare_run_dir(run_dir, run_config, bool(resume), overwrite)
    barrier(dist)
    seed_everything(vision.seed)
    if vision.is_folder:
        size = (vision.image_size, vision.image_size)
        model = build_vision_model(vision.model, 3, size, folder.num_classes)
        data, val = _folder_data(vision, folder, augment, dist)
    else:
        model = build_vision_model(vision.model, train_split.channels, train_split.image_size, train_split.num_classes)
        data = TensorBatches(
            {"pixel_values": train_split.images, "labels": train_split.labels}, vision.batch_size, vision.seed
        )
        val = list(test_split.batches(vision.eval_batch_size))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %s parameters, %d training images", vision.model, f"{n_params:,}", train_size)
    trainer = Trainer(model, data, train, run_dir, val, metrics_fn=accuracy, resume=resume, dist=dist)
    result = trainer.fit(stop_at=stop_at)
    return VisionRun(model, result, trainer, None if trainer.ema is None else trainer.ema.module)
