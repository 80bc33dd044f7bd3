"""The training augmentations of an image folder, the parts of timm's ImageNet recipe, with Kornia's transforms:
random resized crop and horizontal flip, RandAugment, MixUp or CutMix, and soft targets with label smoothing.

Kornia (pure PyTorch) is an optional dependency: ``pip install 'retentive[vision]'``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.image_processing import IMAGENET_MEAN, IMAGENET_STD

try:
    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "training on an image folder needs Kornia for its augmentations: pip install 'retentive[vision]'"
    ) from e

RAND_AUGMENT_SCALE = 10  # timm's magnitudes run over (0, 10), Kornia's over (0, 30): Kornia's m = 3 M
RAND_AUGMENT_FORMAT = "m<M>-n<N> (timm's notation, e.g. m9-n2: N operations of magnitude M in (0, 10)) or none"


def parse_rand_augment(spec: str) -> tuple[int, float] | None:
    """``"m9-n2"`` (timm's notation: ``rand-`` before it and any order allowed) -> (N operations, magnitude M on
    timm's scale); ``"none"`` -> None.

    Raises:
        ValueError: naming ``--rand-augment`` and the form it takes.
    """
    error = ValueError(f"rand_augment (--rand-augment) must be {RAND_AUGMENT_FORMAT}, got {spec!r}")
    if spec == "none":
        return None
    fields: dict[str, float] = {}
    for part in spec.removeprefix("rand-").split("-"):
        key, value = part[:1], part[1:]
        if key not in ("m", "n") or key in fields:
            raise error
        try:
            fields[key] = float(value)
        except ValueError:
            raise error from None
    n, m = fields.get("n"), fields.get("m")
    if n is None or m is None or n != int(n) or not 1 <= n <= 15 or not 0 < m < RAND_AUGMENT_SCALE:
        raise error  # Kornia's default policy has 15 operations, drawn without replacement
    return int(n), m


class TrainAugment:
    """Training images of any size -> a batch augmented as timm trains on ImageNet, and its soft targets.

    1. Each image, on the CPU: a random crop of 8-100% of its area with an aspect ratio in [3/4, 4/3], resized to
       ``image_size`` x ``image_size`` (bilinear).
    2. The batch, on the labels' device: a horizontal flip with probability 1/2; RandAugment (Kornia draws its N
       operations once per batch, their signs per image); standardized with ``mean`` and ``std``.
    3. With probability ``mixup`` MixUp (each image blended with a partner of the batch, the partner's share
       uniform in [0, 1]), else with probability ``cutmix`` CutMix (a box of the partner pasted in, its area share
       from Beta(1, 1)), else neither: timm's recipe switches between the two per batch.
    4. The targets (B, num_classes): the smoothed one-hot label (1 - ε + ε / C on the class, ε / C elsewhere) of
       each image and of its partner, weighted by their shares of the image; each row sums to 1.

    Args:
        image_size: S, the side of the images the model sees.
        num_classes: C.
        rand_augment: (N operations, magnitude M on timm's scale (0, 10)), or None for none.
        mixup, cutmix: the shares of batches mixed by MixUp and by CutMix (their sum at most 1).
        label_smoothing: ε in [0, 1).
        mean, std: per channel, of images in [0, 1].
    """

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        rand_augment: tuple[int, float] | None = (2, 9.0),
        mixup: float = 0.5,
        cutmix: float = 0.5,
        label_smoothing: float = 0.1,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size (--image-size) must be an integer >= 1, got {image_size!r}")
        if not (mixup >= 0 and cutmix >= 0 and mixup + cutmix <= 1):
            raise ValueError(
                f"mixup and cutmix (--mixup, --cutmix) are shares of the batches: each >= 0 and their sum <= 1, "
                f"got {mixup} and {cutmix}"
            )
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing (--label-smoothing) must lie in [0, 1), got {label_smoothing}")
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup_share, self.cutmix_share = mixup, cutmix
        self.crop = K.RandomResizedCrop((image_size, image_size), align_corners=False)
        self.flip = K.RandomHorizontalFlip()
        n, m = rand_augment or (None, None)
        self.rand_augment = None if n is None else RandAugment(n, m * 30 / RAND_AUGMENT_SCALE)
        self.normalize = K.Normalize(torch.tensor(mean), torch.tensor(std))
        self.mixup = K.RandomMixUpV2(data_keys=["input", "class"])
        self.cutmix = K.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=True)

    def smooth(self, labels: Tensor) -> Tensor:
        """Labels (B,) -> smoothed one-hot targets (B, C)."""
        eps = self.label_smoothing
        return F.one_hot(labels, self.num_classes).float() * (1 - eps) + eps / self.num_classes

    def __call__(self, images: list[Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images (3, H_i, W_i) and their labels (B,) -> pixel values (B, 3, S, S) and targets (B, C)."""
        x = torch.cat([self.crop(image.float() / 255) for image in images]).to(labels.device)  # (B, 3, S, S)
        x = self.flip(x)
        if self.rand_augment is not None:
            x = self.rand_augment(x)
        x = self.normalize(x)
        partner, share = labels, torch.zeros(len(labels), device=labels.device)  # the partner's share of the image
        draw = torch.rand(()).item()
        if draw < self.mixup_share:
            x, mixed = self.mixup(x, labels)  # (B, 3): label, partner's label, partner's share
            partner, share = mixed[:, 1].long(), mixed[:, 2]
        elif draw < self.mixup_share + self.cutmix_share:
            x, mixed = self.cutmix(x, labels)  # (1, B, 3): label, partner's label, the image's own share
            partner, share = mixed[0, :, 1].long(), 1 - mixed[0, :, 2]
        return x, torch.lerp(self.smooth(labels), self.smooth(partner), share[:, None].float())
