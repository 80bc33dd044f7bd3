"""ViR (Hatamizadeh et al. 2023, SPEC §6): a ViT whose attention is causal multi-scale retention.

Patches are embedded, a learned position embedding is added, and the class token is appended at the
END, after the position embedding, so that in causal raster order it sees every patch. Pre-norm blocks
with LayerScale run retention without gate and without head norm, gammas by the ``"linspace"`` schedule;
a final LayerNorm, and the head reads the last token. The parallel, chunkwise and recurrent forms give
the same logits; the last two stream the tokens through the whole stack, carrying every layer's state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import ImageClassifierOutput

from ..ops import MODES
from .retnet import RetNet


@dataclass(frozen=True)
class ViRConfig:
    """Shape of a ViR; ``from_preset`` gives the paper's sizes and tiny ones."""

    image_size: int = 224  # square images of this side; the position embedding has one entry per patch
    patch_size: int = 16  # side of a patch; image_size must be a multiple
    in_channels: int = 3
    num_classes: int = 1000
    dim: int = 384  # d
    depth: int = 12  # blocks
    num_heads: int = 6  # retention heads, gammas by the "linspace" schedule
    mlp_ratio: float = 4.0  # FFN hidden width / d
    layer_scale: float | None = 1e-5  # LayerScale init on both branches of every block
    rotary: bool = False  # the learned position embedding already carries position; rotary adds no parameters
    normalize_decay: bool = False  # SPEC §2 decay normalization (no parameters; helps small models train)
    dropout: float = 0.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of num_heads ({self.num_heads})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ViRConfig:
        """A named size (see ``VIR_PRESETS``), with any field overridden."""
        if name not in VIR_PRESETS:
            raise ValueError(f"unknown ViR preset {name!r}; choose one of {sorted(VIR_PRESETS)}")
        return replace(VIR_PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


VIR_PRESETS = {
    "vir-small/16": ViRConfig(dim=384, depth=12, num_heads=6),
    "vir-base/16": ViRConfig(dim=768, depth=12, num_heads=12),
    "vir-large/16": ViRConfig(dim=1024, depth=24, num_heads=16),
    # 28 x 28 grayscale (Fashion-MNIST): 4 x 4 patches of 7 x 7 pixels, 17 tokens with the class token
    "vir-tiny": ViRConfig(
        image_size=28,
        patch_size=7,
        in_channels=1,
        num_classes=10,
        dim=96,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        layer_scale=0.1,
        normalize_decay=True,
    ),
}
# 32 x 32 colour (CIFAR-like): 8 x 8 patches of 4 x 4 pixels
VIR_PRESETS["vir-tiny-32"] = replace(VIR_PRESETS["vir-tiny"], image_size=32, patch_size=4, in_channels=3)


class ViRForImageClassification(nn.Module):
    """ViR with its classification head.

    Args:
        config: a :class:`ViRConfig`.
    """

    _no_split_modules: ClassVar[list[str]] = ["RetNetBlock"]  # the FSDP units (HF convention)

    def __init__(
        self, config: ViRConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.config = c = config
        kw = {"device": device, "dtype": dtype}
        self.patch_embed = nn.Conv2d(c.in_channels, c.dim, c.patch_size, c.patch_size, **kw)
        self.pos_embed = nn.Parameter(torch.empty(1, c.num_patches, c.dim, **kw))
        self.cls_token = nn.Parameter(torch.empty(1, 1, c.dim, **kw))
        self.backbone = RetNet(
            num_layer=c.depth,
            num_heads=c.num_heads,
            dim_model=c.dim,
            dropout=c.dropout,
            value_factor=1,
            msr_gate_fn="none",
            mlp_gate_fn="gelu",
            mlp_mult=c.mlp_ratio,
            mlp_bias=True,
            head_norm="none",
            decay="linspace",
            rotary=c.rotary,
            msr_bias=True,
            normalize_attn=c.normalize_decay,
            norm_eps=c.norm_eps,
            layer_scale=c.layer_scale,
            **kw,
        )
        self.head = nn.Linear(c.dim, c.num_classes, **kw)
        if device is None or torch.device(device).type != "meta":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Images (B, C, S, S) -> tokens (B, num_patches + 1, d): patches + position, then the class token."""
        c = self.config
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"pixel_values must be (batch, {c.in_channels}, {c.image_size}, {c.image_size}), "
                f"got {tuple(pixel_values.shape)}: resize the images or build the config for this size"
            )
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, N, d), raster order
        x = x + self.pos_embed
        return torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)  # (B, N + 1, d)

    def forward_features(self, pixel_values: Tensor, *, mode: str = "parallel", chunk_size: int = 16) -> Tensor:
        """Images -> the normalized tokens of the backbone, (B, num_patches + 1, d).

        ``mode="parallel"`` runs the whole sequence at once; ``"chunkwise"`` feeds ``chunk_size`` tokens at a
        time and ``"recurrent"`` one token at a time through the whole stack, carrying every layer's state.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        x = self.embed(pixel_values)
        if mode == "parallel":
            return self.backbone(x, mode="parallel")
        step = 1 if mode == "recurrent" else chunk_size
        state, outputs = None, []
        for start in range(0, x.shape[1], step):
            y, state = self.backbone(
                x[:, start : start + step], mode=mode, chunk_size=step, state=state, return_state=True
            )
            outputs.append(y)
        return torch.cat(outputs, dim=1)

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        *,
        mode: str = "parallel",
        chunk_size: int = 16,
    ) -> ImageClassifierOutput:
        """Images (B, C, S, S) -> logits (B, num_classes) from the last (class) token; loss if ``labels``."""
        logits = self.head(self.forward_features(pixel_values, mode=mode, chunk_size=chunk_size)[:, -1])
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
