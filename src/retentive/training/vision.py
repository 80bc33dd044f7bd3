"""The image-classification recipe: an offline dataset -> ViR, RMT or the ViT baseline -> :class:`Trainer`.

:func:`train_vision` is what ``retentive train-vision`` runs: the same trainer as the language model
(progress bar, ``metrics.jsonl`` + ``loss.png``, atomic checkpoints, exact resume), with test accuracy as
the evaluation metric.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..data import ImageData, TensorBatches, load_images
from ..models import (
    RMT_PRESETS,
    VIR_PRESETS,
    RMTConfig,
    RMTForImageClassification,
    ViRConfig,
    ViRForImageClassification,
)
from ..models.vit import vit_like
from .checkpoint import check_run_dir, prepare_run_dir
from .distributed import barrier, init_distributed
from .trainer import TrainConfig, Trainer, TrainResult, seed_everything

logger = logging.getLogger(__name__)

BASELINES = {"vit-tiny": "vir-tiny", "vit-tiny-32": "vir-tiny-32"}  # a ViT shaped like this ViR preset
VISION_MODELS = tuple(sorted(VIR_PRESETS)) + tuple(sorted(RMT_PRESETS)) + tuple(BASELINES)


@dataclass
class VisionConfig:
    """What the run trains and on what (the trainer's options are in :class:`TrainConfig`)."""

    model: str = "vir-tiny"  # a ViR or RMT preset, or a ViT baseline ("vit-tiny")
    data: str = "fashion-mnist"  # "fashion-mnist" or "digits"
    data_root: str | None = None  # where Fashion-MNIST's idx files are (default: the Debian package's path)
    batch_size: int = 128
    epochs: float | None = 3.0  # passes over the training set; sets the trainer's steps (None: keep them)
    eval_batch_size: int = 500
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VisionRun:
    model: nn.Module
    result: TrainResult
    trainer: Trainer


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
    """Train an image classifier and evaluate its test accuracy.

    Args:
        vision: model and data options.
        train: the trainer's options (``steps`` comes from ``vision.epochs`` unless that is None; ``perplexity``
            is ignored: classifiers report accuracy).
        run_dir: the run directory (refused if it holds a different run, unless ``resume`` or ``overwrite``).
        resume: continue the run in ``run_dir`` (True) or from this checkpoint folder.
        overwrite: start afresh, deleting what ``run_dir`` holds.
        stop_at: stop after this step (see :meth:`Trainer.fit`).
        train_split, test_split: data already loaded (default: ``load_images(vision.data, ...)``).
    """
    train_split = train_split or load_images(vision.data, "train", vision.data_root)
    test_split = test_split or load_images(vision.data, "test", vision.data_root)
    epochs = vision.epochs
    steps = train.steps if epochs is None else steps_for_epochs(epochs, len(train_split), vision.batch_size)
    train = replace(train, steps=steps, perplexity=False)
    run_config = {"vision": vision.to_dict(), "train": train.to_dict()}
    check_run_dir(run_dir, run_config, bool(resume), overwrite)  # every process, before the group forms (see lm.py)
    dist = init_distributed(train.device)
    if dist.is_main:
        prepare_run_dir(run_dir, run_config, bool(resume), overwrite)
    barrier(dist)
    seed_everything(vision.seed)
    model = build_vision_model(vision.model, train_split.channels, train_split.image_size, train_split.num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %s parameters, %d training images", vision.model, f"{n_params:,}", len(train_split))
    data = TensorBatches(
        {"pixel_values": train_split.images, "labels": train_split.labels}, vision.batch_size, vision.seed
    )
    val = list(test_split.batches(vision.eval_batch_size))
    trainer = Trainer(model, data, train, run_dir, val, metrics_fn=accuracy, resume=resume, dist=dist)
    result = trainer.fit(stop_at=stop_at)
    return VisionRun(model, result, trainer)
