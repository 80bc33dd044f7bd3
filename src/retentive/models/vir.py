"""ViR (Hatamizadeh et al. 2023): a ViT whose attention is causal multi-scale retention.

Patches are embedded, a learned position embedding is added, and the class token is appended at the
END, after the position embedding, so that in causal raster order it sees every patch. Pre-norm blocks
with LayerScale run retention without gate and without head norm, gammas by the ``"linspace"`` schedule;
a final LayerNorm, and the head reads the last token. The parallel, chunkwise and recurrent forms give
the same logits; the last two stream the tokens through the whole stack, carrying every layer's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import ImageClassifierOutput

from ..ops import MODES, check_chunk_size
from .image_classifier import ImageClassifier, PreTrainedImageBackbone, PreTrainedImageClassifier, take_indices
from .preset_config import BackboneConfig, check_heads, check_positive_int
from .retnet import RetNet

# name -> the fields that differ from the defaults
VIR_PRESETS: dict[str, dict[str, Any]] = {
    "vir-small/16": dict(dim_model=384, num_layers=12, num_heads=6),
    "vir-base/16": dict(dim_model=768, num_heads=12),
    "vir-large/16": dict(dim_model=1024, num_layers=24, num_heads=16),
    # 28 x 28 grayscale (Fashion-MNIST): 4 x 4 patches of 7 x 7 pixels, 17 tokens with the class token
    "vir-tiny": dict(
        image_size=28,
        patch_size=7,
        in_channels=1,
        num_classes=10,
        dim_model=96,
        num_layers=4,
        num_heads=4,
        ffn_ratio=2.0,
        layer_scale=0.1,
        normalize_decay=True,
    ),
}
# 32 x 32 colour (CIFAR-like): 8 x 8 patches of 4 x 4 pixels
VIR_PRESETS["vir-tiny-32"] = {**VIR_PRESETS["vir-tiny"], "image_size": 32, "patch_size": 4, "in_channels": 3}


class ViRConfig(BackboneConfig):
    """Configuration of :class:`ViRForImageClassification` (model_type ``"vir"``).

    Fields in the library's names: ``dim_model``, ``num_layers``, ``num_heads``, and ``ffn_ratio`` for the FFN
    width as a multiple of d (ViT's convention; ``ffn_dim`` is the width it gives). The earlier names ``dim``,
    ``depth`` and ``mlp_ratio``, Hugging Face's ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads`` and
    ``num_labels`` are aliases. Build one with ``ViRConfig(**fields)`` or ``ViRConfig.from_preset(name,
    **overrides)`` (see ``VIR_PRESETS``).
    """

    model_type: ClassVar[str] = "vir"
    presets: ClassVar[dict[str, dict[str, Any]]] = VIR_PRESETS
    attribute_map: ClassVar[dict[str, str]] = {
        "dim": "dim_model",
        "depth": "num_layers",
        "mlp_ratio": "ffn_ratio",
        "hidden_size": "dim_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_labels": "num_classes",
    }

    image_size: int = 224  # square images of this side; the position embedding has one entry per patch
    patch_size: int = 16  # side of a patch; image_size must be a multiple
    in_channels: int = 3
    num_classes: int = 1000
    dim_model: int = 384  # d
    num_layers: int = 12  # blocks
    num_heads: int = 6  # retention heads, gammas by the "linspace" schedule
    ffn_ratio: float = 4.0  # FFN hidden width / d
    layer_scale: float | None = 1e-5  # LayerScale init on both branches of every block; None: no LayerScale
    rotary: bool = False  # the learned position embedding already carries position; rotary adds no parameters
    normalize_decay: bool = False  # docs/math.md, "Normalizations" (no parameters; helps small models train)
    dropout: float = 0.0
    norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_stages(self) -> int:
        """The backbone's stages (``stage_names`` after the stem): its blocks, as for transformers' ViTs (DINOv2)."""
        return self.num_layers

    @property
    def ffn_dim(self) -> int:
        """The FFN hidden width, round(ffn_ratio * d), as the backbone builds it."""
        return round(self.ffn_ratio * self.dim_model)

    def validate(self) -> None:
        """Raise ValueError naming the field if this config cannot build a working model."""
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "dim_model", "num_layers", "num_heads"):
            check_positive_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}): "
                "the patches tile the image; change one of them"
            )
        check_heads(self.dim_model, self.num_heads, self.rotary)
        if not self.ffn_ratio > 0 or self.ffn_dim < 1:
            raise ValueError(f"ffn_ratio must be > 0 with round(ffn_ratio * dim_model) >= 1, got {self.ffn_ratio!r}")
        if self.layer_scale is not None and not self.layer_scale > 0:
            raise ValueError(f"layer_scale must be None (no LayerScale) or > 0, got {self.layer_scale!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")


class ViRForImageClassification(ImageClassifier):
    """ViR with its classification head.

    Args:
        config: a :class:`ViRConfig`.
    """

    _no_split_modules: ClassVar[list[str]] = ["RetNetBlock"]  # the FSDP units (HF convention)
    config_class = ViRConfig
    pretrained_class = "PreTrainedViR"
    backbone_class = "ViRBackbone"
    output_fmts = ("NCHW", "NLC")

    def __init__(
        self, config: ViRConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(config)
        c, kw = config, {"device": device, "dtype": dtype}
        self.patch_embed = nn.Conv2d(c.in_channels, c.dim_model, c.patch_size, c.patch_size, **kw)
        self.pos_embed = nn.Parameter(torch.empty(1, c.num_patches, c.dim_model, **kw))
        # the class token: None once prune_intermediate_layers removes the classifier (the patches never read it)
        self.cls_token: nn.Parameter | None = nn.Parameter(torch.empty(1, 1, c.dim_model, **kw))
        self.backbone = RetNet.from_options(
            c.num_layers,
            c.num_heads,
            c.dim_model,
            c.ffn_dim,
            dropout=c.dropout,
            value_factor=1,
            gate_fn="none",
            ffn_activation="gelu",
            ffn_bias=True,
            head_norm="none",
            decay="linspace",
            rotary=c.rotary,
            msr_bias=True,
            normalize_decay=c.normalize_decay,
            norm_eps=c.norm_eps,
            layer_scale=c.layer_scale,
            **kw,
        )
        self.head = nn.Linear(c.dim_model, c.num_classes, **kw)
        if device is None or torch.device(device).type != "meta":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Images (B, C, S, S) -> tokens (B, num_patches + 1, d): patches + position, then the class token (where
        the classifier has not been pruned)."""
        c = self.config
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"pixel_values must be (batch, {c.in_channels}, {c.image_size}, {c.image_size}), "
                f"got {tuple(pixel_values.shape)}: resize the images or build the config for this size"
            )
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, N, d), raster order
        x = x + self.pos_embed
        if self.cls_token is None:
            return x
        return torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)  # (B, N + 1, d)

    def forward_features(
        self,
        pixel_values: Tensor,
        *,
        mode: str = "parallel",
        chunk_size: int = 16,
        hidden_states: list[Tensor] | None = None,
        depth: int | None = None,
    ) -> Tensor:
        """Images -> the normalized tokens of the backbone, (B, num_patches + 1, d).

        ``mode="parallel"`` runs the whole sequence at once; ``"chunkwise"`` feeds ``chunk_size`` tokens at a
        time and ``"recurrent"`` one token at a time through the whole stack, carrying every layer's state.
        ``hidden_states``, a list, gets num_layers + 1 tensors (B, num_patches + 1, d), as the language model gives
        them: the embedded tokens, each block's output, and the normalized output last (what this returns).
        ``depth`` runs the first ``depth`` blocks alone and returns the last one's output without the final norm
        (``hidden_states`` then gets depth + 1 tensors).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_chunk_size(chunk_size)
        x = self.embed(pixel_values)
        T = x.shape[1]
        step = {"parallel": T, "chunkwise": chunk_size, "recurrent": 1}[mode]
        state, outputs, layers = None, [], []  # layers: per piece, each block's input and the output
        for start in range(0, T, step):
            inputs = None if hidden_states is None else []
            y = self.backbone(
                x[:, start : start + step],
                mode=mode,
                chunk_size=step,
                state=state,
                return_state=step < T,  # a state to carry into the next piece
                hidden_states=inputs,
                depth=depth,
            )
            if step < T:
                y, state = y
            outputs.append(y)
            if inputs is not None:
                layers.append([*inputs, y])
        if hidden_states is not None:
            hidden_states.extend(torch.cat(piece, dim=1) for piece in zip(*layers, strict=True))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        *,
        mode: str = "parallel",
        chunk_size: int = 16,
        output_hidden_states: bool = False,
    ) -> ImageClassifierOutput:
        """Images (B, C, S, S) -> logits (B, num_classes) from the last (class) token; loss if ``labels``; with
        ``output_hidden_states``, the tokens entering each block and the normalized output, num_layers + 1 tensors
        (B, num_patches + 1, d) (see :meth:`forward_features`)."""
        hidden = [] if output_hidden_states else None
        features = self.forward_features(pixel_values, mode=mode, chunk_size=chunk_size, hidden_states=hidden)
        return self.classify(self.forward_head(features), labels, hidden)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, num_patches + 1, d) -> logits (B, num_classes) from the last (class) token, or with
        ``pre_logits`` that token (B, d)."""
        if self.cls_token is None:
            raise RuntimeError(
                "the classifier was pruned (prune_intermediate_layers): this model gives feature maps alone, "
                "through forward_intermediates"
            )
        x = features[:, -1]
        return x if pre_logits else self.head(x)

    @property
    def num_features(self) -> int:
        return self.config.dim_model

    @property
    def head_hidden_size(self) -> int:
        return self.config.dim_model

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """Every block's output, d channels at stride ``patch_size`` (as timm's ViTs)."""
        c = self.config
        return [
            {"num_chs": c.dim_model, "reduction": c.patch_size, "module": f"backbone.blocks.{i}"}
            for i in range(self.backbone.num_layers)
        ]

    def feature_map(self, hidden: Tensor, norm: bool = False) -> Tensor:
        """Tokens (B, num_patches + 1, d), or (B, num_patches, d) once the class token is pruned -> the patches as a
        map (B, d, S / patch_size, S / patch_size), with the final norm if ``norm``."""
        c = self.config
        patches = (self.backbone.norm(hidden) if norm else hidden)[:, : c.num_patches]  # (B, N, d)
        return patches.mT.unflatten(2, (c.image_size // c.patch_size,) * 2)

    def normalize(self, features: Tensor) -> Tensor:
        return self.backbone.norm(features)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] | None = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Here the classifier is the head and the class token it reads: causal, the patches never read the class
        token (last), so their maps stay the same without it. See :meth:`ImageClassifier.prune_intermediate_layers`."""
        take = take_indices(self.backbone.num_layers, indices)
        self.backbone.blocks = self.backbone.blocks[: max(take) + 1]
        if prune_norm:
            self.backbone.norm = nn.Identity()
        if prune_head:
            self.cls_token, self.head = None, nn.Identity()
        return take


class PreTrainedViR(PreTrainedImageClassifier):
    """:class:`ViRForImageClassification` for transformers' Auto classes and pipelines."""

    config_class = ViRConfig
    classifier_class = ViRForImageClassification


class ViRBackbone(PreTrainedImageBackbone):
    """ViR's feature maps as transformers' backbone (``AutoBackbone``, UperNet's ``backbone_config``...)."""

    config_class = ViRConfig
    classifier_class = ViRForImageClassification
