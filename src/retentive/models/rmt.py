"""RMT (Fan et al., CVPR 2024, SPEC §6): a four-stage vision backbone of Manhattan self-attention.

A convolutional stem (4x smaller grid), stages of :class:`RMTBlock` s (MaSAD, rows then columns, or
MaSA over the whole grid, chosen per stage; per-head gamma by stage) separated by patch merging, then
the official head: a linear projection, BatchNorm, swish, global average pooling and the classifier.
The layout follows the official classification code, so the named sizes have its parameter counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import ImageClassifierOutput

from ..layers.conv import ConvStem, PatchMerging
from ..layers.rmt_block import RMTBlock


@dataclass(frozen=True)
class RMTConfig:
    """Shape of an RMT; one entry per stage in each tuple. ``from_preset`` gives the named sizes."""

    in_channels: int = 3
    num_classes: int = 1000
    dims: tuple[int, ...] = (64, 128, 256, 512)  # width of each stage
    depths: tuple[int, ...] = (2, 2, 8, 2)  # blocks per stage
    num_heads: tuple[int, ...] = (4, 4, 8, 16)
    heads_ranges: tuple[float, ...] = (4, 4, 6, 6)  # gamma_h = 1 - 2^-(initial_value + range * h / H)
    initial_value: float = 2.0
    mlp_ratios: tuple[float, ...] = (3, 3, 3, 3)  # conv FFN hidden width / stage width
    decomposed: tuple[bool, ...] = (True, True, False, False)  # MaSAD (True) or MaSA (False) per stage
    layer_scales: tuple[bool, ...] = (False, False, False, False)  # LayerScale per stage
    layer_scale_init: float = 1e-6
    projection: int = 1024  # width of the head's projection before pooling
    image_size: int = 224  # nominal; any size works (odd and non-square grids included)

    def __post_init__(self) -> None:
        fields = ("dims", "depths", "num_heads", "heads_ranges", "mlp_ratios", "decomposed", "layer_scales")
        lengths = {name: len(getattr(self, name)) for name in fields}
        if len(set(lengths.values())) != 1 or not lengths["dims"]:
            raise ValueError(f"every per-stage field needs one entry per stage, got lengths {lengths}")

    @property
    def num_stages(self) -> int:
        return len(self.dims)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> RMTConfig:
        """A named size (see ``RMT_PRESETS``), with any field overridden."""
        if name not in RMT_PRESETS:
            raise ValueError(f"unknown RMT preset {name!r}; choose one of {sorted(RMT_PRESETS)}")
        return replace(RMT_PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


RMT_PRESETS = {
    "rmt-t": RMTConfig(),
    "rmt-s": RMTConfig(depths=(3, 4, 18, 4), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False)),
    "rmt-b": RMTConfig(
        dims=(80, 160, 320, 512),
        depths=(4, 8, 25, 8),
        num_heads=(5, 5, 10, 16),
        heads_ranges=(5, 5, 6, 6),
        mlp_ratios=(4, 4, 3, 3),
        decomposed=(True, True, True, False),
        layer_scales=(False, False, True, True),
    ),
    "rmt-l": RMTConfig(
        dims=(112, 224, 448, 640),
        depths=(4, 8, 25, 8),
        num_heads=(7, 7, 14, 20),
        heads_ranges=(6, 6, 6, 6),
        mlp_ratios=(4, 4, 3, 3),
        decomposed=(True, True, True, False),
        layer_scales=(False, False, True, True),
    ),
    # 28 x 28 grayscale (Fashion-MNIST): stem -> 7 x 7 (MaSAD), merge -> 4 x 4 (MaSA), merge -> 2 x 2 (MaSA)
    "rmt-tiny": RMTConfig(
        in_channels=1,
        num_classes=10,
        dims=(32, 64, 128),
        depths=(1, 2, 1),
        num_heads=(2, 4, 8),
        heads_ranges=(4, 4, 6),
        mlp_ratios=(2, 2, 2),
        decomposed=(True, False, False),
        layer_scales=(False, False, False),
        projection=256,
        image_size=28,
    ),
}
# 32 x 32 colour (CIFAR-like): 8 x 8, 4 x 4, 2 x 2
RMT_PRESETS["rmt-tiny-32"] = replace(RMT_PRESETS["rmt-tiny"], in_channels=3, image_size=32)


class RMTStage(nn.Module):
    """The blocks of one stage, then patch merging to the next stage's width (none after the last)."""

    def __init__(self, config: RMTConfig, index: int, **kw) -> None:
        super().__init__()
        c, i = config, index
        self.blocks = nn.ModuleList(
            RMTBlock(
                c.dims[i],
                c.num_heads[i],
                int(c.mlp_ratios[i] * c.dims[i]),
                decomposed=c.decomposed[i],
                initial_value=c.initial_value,
                heads_range=c.heads_ranges[i],
                layer_scale=c.layer_scale_init if c.layer_scales[i] else None,
                **kw,
            )
            for _ in range(c.depths[i])
        )
        last = i == c.num_stages - 1
        self.downsample = None if last else PatchMerging(c.dims[i], c.dims[i + 1], **kw)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, height, width, C) -> (B, height', width', C')."""
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class RMTForImageClassification(nn.Module):
    """RMT with the official classification head.

    Args:
        config: an :class:`RMTConfig`.
    """

    _no_split_modules: ClassVar[list[str]] = ["RMTBlock"]  # the FSDP units (HF convention)

    def __init__(
        self, config: RMTConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.config = c = config
        kw = {"device": device, "dtype": dtype}
        self.stem = ConvStem(c.in_channels, c.dims[0], **kw)
        self.stages = nn.ModuleList(RMTStage(c, i, **kw) for i in range(c.num_stages))
        self.proj = nn.Linear(c.dims[-1], c.projection, **kw)
        self.norm = nn.BatchNorm1d(c.projection, **kw)
        self.head = nn.Linear(c.projection, c.num_classes, **kw)
        if device is None or torch.device(device).type != "meta":
            self.apply(_init_linear)

    def forward_features(self, pixel_values: Tensor) -> Tensor:
        """Images (B, C, H, W) -> pooled features (B, projection)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.in_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}"
            )
        x = self.stem(pixel_values)  # (B, H/4, W/4, C0)
        for stage in self.stages:
            x = stage(x)
        x = self.proj(x).flatten(1, 2)  # (B, h * w, projection)
        x = F.silu(self.norm(x.transpose(1, 2)))  # (B, projection, h * w)
        return x.mean(-1)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> ImageClassifierOutput:
        """Images (B, C, H, W), any H and W -> logits (B, num_classes); loss if ``labels``."""
        logits = self.head(self.forward_features(pixel_values))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_linear(module: nn.Module) -> None:
    """Truncated normal (std 0.02) on every linear layer, attention included, as the official code does last."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
