"""ResizeCropImageProcessor: the evaluation preprocessing of ImageNet classifiers, for transformers' Auto classes.

Resize the shorter side to ``crop_size / crop_pct`` (bicubic), centre crop ``crop_size``, scale to [0, 1],
standardize per channel: the official RMT evaluation (256, then 224: ``crop_pct`` 0.875). Written with PIL and
NumPy alone, so it gives the same pixels whether or not torchvision is installed (transformers' own processors
switch to torchvision's resize when it is).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import BaseImageProcessor, BatchFeature

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class ResizeCropImageProcessor(BaseImageProcessor):
    """Images (PIL, or uint8 arrays (H, W) / (H, W, C)) -> ``pixel_values`` (N, C, crop_size, crop_size).

    Args:
        crop_size: side of the square the model sees.
        crop_pct: the centre crop's share of the resized shorter side (0.875: 256 -> 224; 1: no margin).
        interpolation: ``"bicubic"`` or ``"bilinear"``, the resize's filter (PIL's).
        image_mean, image_std: per channel, of images scaled to [0, 1]; their length is the number of channels
            (1: grayscale, 3: RGB).
    """

    model_input_names = ["pixel_values"]  # noqa: RUF012 (transformers' class attribute)

    def __init__(
        self,
        crop_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        image_mean: list[float] | tuple[float, ...] = IMAGENET_MEAN,
        image_std: list[float] | tuple[float, ...] = IMAGENET_STD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(crop_size, int) or crop_size < 1:
            raise ValueError(f"crop_size must be an integer >= 1, got {crop_size!r}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct!r}")
        if interpolation not in RESAMPLE:
            raise ValueError(f"interpolation must be one of {tuple(RESAMPLE)}, got {interpolation!r}")
        if len(image_mean) not in (1, 3) or len(image_std) != len(image_mean) or min(image_std) <= 0:
            raise ValueError(
                f"image_mean and image_std need one entry per channel (1: grayscale, 3: RGB), std > 0, got "
                f"{image_mean!r} and {image_std!r}"
            )
        self.crop_size, self.crop_pct, self.interpolation = crop_size, crop_pct, interpolation
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    @classmethod
    def for_config(cls, config: Any) -> ResizeCropImageProcessor:
        """The default for a vision config: its ``image_size`` at ``crop_pct`` 0.875, ImageNet's mean and std (their
        channel average for one channel, as timm does)."""
        if config.in_channels == 3:
            return cls(crop_size=config.image_size)
        mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
        return cls(
            crop_size=config.image_size, image_mean=[mean] * config.in_channels, image_std=[std] * config.in_channels
        )

    @property
    def resize_size(self) -> int:
        """The shorter side after resizing (256 for 224 at 0.875)."""
        return int(self.crop_size / self.crop_pct)

    def transform(self, image: Image.Image | np.ndarray) -> Tensor:
        """One image -> (C, crop_size, crop_size) float32, as torchvision's Resize, CenterCrop, ToTensor, Normalize
        would make it from the PIL image."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"images must be PIL images or uint8 arrays, got {type(image).__name__}")
        image = image.convert("L" if len(self.image_mean) == 1 else "RGB")
        w, h = image.size
        short = self.resize_size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        image = image.resize(size, RESAMPLE[self.interpolation])
        w, h = size
        top, left = round((h - self.crop_size) / 2), round((w - self.crop_size) / 2)
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).reshape(self.crop_size, self.crop_size, -1)
        mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
        return ((x - mean) / std).permute(2, 0, 1)  # (C, crop_size, crop_size)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """An image or a list of images -> ``BatchFeature`` with ``pixel_values`` (N, C, crop_size, crop_size)."""
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        pixel_values = torch.stack([self.transform(image) for image in images])
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)
