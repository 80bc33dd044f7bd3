"""RMT (Fan et al., CVPR 2024): a four-stage vision backbone of Manhattan self-attention.

A convolutional stem (4x smaller grid), stages of :class:`RMTBlock` s (MaSAD, rows then columns, or
MaSA over the whole grid, chosen per stage; per-head gamma by stage) separated by patch merging, then
the official head: a linear projection, BatchNorm, swish, global average pooling and the classifier.
The layout follows the official classification code, so the named sizes have its parameter counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import ImageClassifierOutput

from ..layers.checkpointing import CheckpointedBlocks
from ..layers.conv import ConvStem, PatchMerging
from ..layers.rmt_block import RMTBlock
from .image_classifier import ImageClassifier, PreTrainedImageBackbone, PreTrainedImageClassifier, take_indices
from .preset_config import BackboneConfig, check_positive_int

# name -> the fields that differ from the defaults (the defaults are RMT-T)
RMT_PRESETS: dict[str, dict[str, Any]] = {
    "rmt-t": {},
    "rmt-s": dict(num_layers=(3, 4, 18, 4), ffn_ratio=(4, 4, 3, 3), decomposed=(True, True, True, False)),
    "rmt-b": dict(
        dim_model=(80, 160, 320, 512),
        num_layers=(4, 8, 25, 8),
        num_heads=(5, 5, 10, 16),
        heads_range=(5, 5, 6, 6),
        ffn_ratio=(4, 4, 3, 3),
        decomposed=(True, True, True, False),
        layer_scales=(False, False, True, True),
    ),
}
# RMT-L: RMT-B's blocks and per-stage options, wider
RMT_PRESETS["rmt-l"] = {
    **RMT_PRESETS["rmt-b"],
    "dim_model": (112, 224, 448, 640),
    "num_heads": (7, 7, 14, 20),
    "heads_range": (6, 6, 6, 6),
}
# 28 x 28 grayscale (Fashion-MNIST): stem -> 7 x 7 (MaSAD), merge -> 4 x 4 (MaSA), merge -> 2 x 2 (MaSA)
RMT_PRESETS["rmt-tiny"] = dict(
    in_channels=1,
    num_classes=10,
    dim_model=(32, 64, 128),
    num_layers=(1, 2, 1),
    num_heads=(2, 4, 8),
    heads_range=(4, 4, 6),
    ffn_ratio=(2, 2, 2),
    decomposed=(True, False, False),
    layer_scales=(False, False, False),
    projection=256,
    image_size=28,
)
# 32 x 32 colour (CIFAR-like): 8 x 8, 4 x 4, 2 x 2
RMT_PRESETS["rmt-tiny-32"] = {**RMT_PRESETS["rmt-tiny"], "in_channels": 3, "image_size": 32}

# the fields with one entry per stage
STAGE_FIELDS = ("dim_model", "num_layers", "num_heads", "heads_range", "ffn_ratio", "decomposed", "layer_scales")


class RMTConfig(BackboneConfig):
    """Configuration of :class:`RMTForImageClassification` (model_type ``"rmt"``).

    Each field of ``STAGE_FIELDS`` is a tuple with one entry per stage, in the library's names: ``dim_model`` (the
    stage's width), ``num_layers`` (its blocks), ``num_heads``, ``heads_range`` (the spread of its heads' decay),
    ``ffn_ratio`` (the conv FFN's hidden width / the stage's width), ``decomposed`` (MaSAD or MaSA) and
    ``layer_scales`` (LayerScale or not). The earlier names ``dims``, ``depths``, ``mlp_ratios`` and
    ``heads_ranges``, and Hugging Face's ``num_labels``, are aliases. Build one with ``RMTConfig(**fields)`` or
    ``RMTConfig.from_preset(name, **overrides)`` (see ``RMT_PRESETS``).
    """

    model_type: ClassVar[str] = "rmt"
    presets: ClassVar[dict[str, dict[str, Any]]] = RMT_PRESETS
    attribute_map: ClassVar[dict[str, str]] = {
        "dims": "dim_model",
        "depths": "num_layers",
        "mlp_ratios": "ffn_ratio",
        "heads_ranges": "heads_range",
        "num_labels": "num_classes",
    }

    in_channels: int = 3
    num_classes: int = 1000
    dim_model: tuple[int, ...] = (64, 128, 256, 512)  # width of each stage
    num_layers: tuple[int, ...] = (2, 2, 8, 2)  # blocks per stage
    num_heads: tuple[int, ...] = (4, 4, 8, 16)
    heads_range: tuple[float, ...] = (4, 4, 6, 6)  # gamma_h = 1 - 2^-(initial_value + heads_range * h / H)
    initial_value: float = 2.0
    ffn_ratio: tuple[float, ...] = (3, 3, 3, 3)  # conv FFN hidden width / stage width
    decomposed: tuple[bool, ...] = (True, True, False, False)  # MaSAD (True) or MaSA (False) per stage
    layer_scales: tuple[bool, ...] = (False, False, False, False)  # LayerScale per stage
    layer_scale_init: float = 1e-6  # its initial value where a stage has it
    projection: int = 1024  # width of the head's projection before pooling
    image_size: int = 224  # nominal; any size works (odd and non-square grids included)

    @property
    def num_stages(self) -> int:
        return len(self.dim_model)

    def validate(self) -> None:
        """Raise ValueError naming the field if this config cannot build a working model."""
        lengths = {name: len(getattr(self, name)) for name in STAGE_FIELDS}
        if len(set(lengths.values())) != 1 or not lengths["dim_model"]:
            raise ValueError(f"every per-stage field needs one entry per stage, got lengths {lengths}")
        for name in ("in_channels", "num_classes", "projection"):
            check_positive_int(name, getattr(self, name))
        for name in ("dim_model", "num_layers", "num_heads"):
            for stage, value in enumerate(getattr(self, name)):
                check_positive_int(f"{name}[{stage}]", value)
        for stage, (dim, heads) in enumerate(zip(self.dim_model, self.num_heads, strict=True)):
            if dim % heads or (dim // heads) % 2:
                raise ValueError(
                    f"dim_model[{stage}] ({dim}) must be a multiple of num_heads[{stage}] ({heads}) with an even "
                    "quotient: each head gets dim_model / num_heads features, rotated in pairs"
                )
        if not self.initial_value > 0 or not all(r >= 0 for r in self.heads_range):
            raise ValueError(
                f"initial_value must be > 0 and every heads_range >= 0, got {self.initial_value!r} and "
                f"{self.heads_range!r}"
            )
        if not all(r > 0 for r in self.ffn_ratio):
            raise ValueError(f"every ffn_ratio must be > 0, got {self.ffn_ratio!r}")
        if not self.layer_scale_init > 0:
            raise ValueError(f"layer_scale_init must be > 0, got {self.layer_scale_init!r}")


class RMTStage(CheckpointedBlocks, nn.Module):
    """The blocks of one stage, then patch merging to the next stage's width (none after the last); its blocks'
    activations recomputed in the backward pass after ``set_grad_checkpointing()``."""

    def __init__(self, config: RMTConfig, index: int, **kw) -> None:
        super().__init__()
        c, i = config, index
        self.blocks = nn.ModuleList(
            RMTBlock(
                c.dim_model[i],
                c.num_heads[i],
                int(c.ffn_ratio[i] * c.dim_model[i]),
                decomposed=c.decomposed[i],
                initial_value=c.initial_value,
                heads_range=c.heads_range[i],
                layer_scale=c.layer_scale_init if c.layer_scales[i] else None,
                **kw,
            )
            for _ in range(c.num_layers[i])
        )
        last = i == c.num_stages - 1
        self.downsample = None if last else PatchMerging(c.dim_model[i], c.dim_model[i + 1], **kw)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, height, width, C) -> (B, height', width', C')."""
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)

    def forward_blocks(self, x: Tensor) -> Tensor:
        """The blocks alone, before the merging: (B, height, width, C) -> the same shape."""
        for i, block in enumerate(self.blocks):
            x = self.run_block(i, block, x)
        return x


class RMTForImageClassification(ImageClassifier):
    """RMT with the official classification head.

    Args:
        config: an :class:`RMTConfig`.
    """

    _no_split_modules: ClassVar[list[str]] = ["RMTBlock"]  # the FSDP units (HF convention)
    config_class = RMTConfig
    pretrained_class = "PreTrainedRMT"
    backbone_class = "RMTBackbone"

    def __init__(
        self, config: RMTConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(config)
        c, kw = config, {"device": device, "dtype": dtype}
        self.stem = ConvStem(c.in_channels, c.dim_model[0], **kw)
        self.stages = nn.ModuleList(RMTStage(c, i, **kw) for i in range(c.num_stages))
        # the classifier's projection and norm: None once prune_intermediate_layers removes it
        self.proj: nn.Linear | None = nn.Linear(c.dim_model[-1], c.projection, **kw)
        self.norm: nn.BatchNorm1d | None = nn.BatchNorm1d(c.projection, **kw)
        self.head = nn.Linear(c.projection, c.num_classes, **kw)
        if device is None or torch.device(device).type != "meta":
            self.apply(_init_linear)

    def forward_features(
        self, pixel_values: Tensor, hidden_states: list[Tensor] | None = None, depth: int | None = None
    ) -> Tensor:
        """Images (B, C, H, W) -> the last stage's feature map (B, C_last, H / 32, W / 32) for four stages.

        ``hidden_states``, a list, gets num_stages + 1 maps (B, C_i, H_i, W_i), as transformers' hierarchical models
        (ConvNeXt) give them: the stem's output at stride 4, then each stage's before its merging (the maps of
        :meth:`forward_stages`), the last one what this returns. ``depth`` runs the first ``depth`` stages alone,
        the last of them without its merging.
        """
        self._check(pixel_values)
        if depth is not None and not (isinstance(depth, int) and 1 <= depth <= len(self.stages)):
            raise ValueError(f"depth must be an integer from 1 to num_stages ({len(self.stages)}), got {depth!r}")
        stages = self.stages if depth is None else self.stages[:depth]
        x = self.stem(pixel_values)  # (B, H/4, W/4, C0)
        if hidden_states is not None:
            hidden_states.append(x.permute(0, 3, 1, 2))
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if hidden_states is not None:
                hidden_states.append(x.permute(0, 3, 1, 2))
            if stage.downsample is not None and i + 1 < len(stages):
                x = stage.downsample(x)
        return x.permute(0, 3, 1, 2)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """The last feature map (B, C_last, h, w) -> logits (B, num_classes), or with ``pre_logits`` the pooled
        features (B, projection): projection, BatchNorm over (B, projection, h * w), swish, mean."""
        if self.proj is None:
            raise RuntimeError(
                "the classifier was pruned (prune_intermediate_layers): this model gives feature maps alone, "
                "through forward_intermediates"
            )
        x = self.proj(features.flatten(2).transpose(1, 2))  # (B, h * w, projection)
        x = F.silu(self.norm(x.transpose(1, 2))).mean(-1)  # (B, projection)
        return x if pre_logits else self.head(x)

    @property
    def num_features(self) -> int:
        return self.config.dim_model[len(self.stages) - 1]

    @property
    def head_hidden_size(self) -> int:
        return self.config.projection

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The stages' maps: ``dim_model[i]`` channels at stride 4 * 2^i."""
        return [
            {"num_chs": self.config.dim_model[i], "reduction": 4 * 2**i, "module": f"stages.{i}"}
            for i in range(len(self.stages))
        ]

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] | None = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Here the classifier is the projection, its norm and the head (what ``forward_head`` runs), and it goes
        with the last stage, which it reads. See :meth:`ImageClassifier.prune_intermediate_layers`."""
        take = take_indices(len(self.stages), indices)
        if max(take) + 1 < len(self.stages):
            self.stages = self.stages[: max(take) + 1]
            self.stages[-1].downsample = None
            prune_head = True
        if prune_head:
            self.proj, self.norm, self.head = None, None, nn.Identity()
        return take

    def _check(self, pixel_values: Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.in_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}"
            )

    def forward_stages(self, pixel_values: Tensor) -> list[Tensor]:
        """Images (B, C, H, W) -> each stage's feature map before its merging, (B, C_i, H_i, W_i), at strides 4, 8,
        16, 32 for four stages: the inputs of a detection or segmentation neck (:meth:`forward_intermediates`)."""
        return self.forward_intermediates(pixel_values, intermediates_only=True)

    def forward(
        self, pixel_values: Tensor, labels: Tensor | None = None, output_hidden_states: bool = False
    ) -> ImageClassifierOutput:
        """Images (B, C, H, W), any H and W -> logits (B, num_classes); loss if ``labels``; with
        ``output_hidden_states``, the stem's map and each stage's (see :meth:`forward_features`)."""
        hidden = [] if output_hidden_states else None
        return self.classify(self.forward_head(self.forward_features(pixel_values, hidden)), labels, hidden)


class PreTrainedRMT(PreTrainedImageClassifier):
    """:class:`RMTForImageClassification` for transformers' Auto classes and pipelines."""

    config_class = RMTConfig
    classifier_class = RMTForImageClassification


class RMTBackbone(PreTrainedImageBackbone):
    """RMT's feature maps as transformers' backbone (``AutoBackbone``, UperNet's ``backbone_config``...)."""

    config_class = RMTConfig
    classifier_class = RMTForImageClassification


def _init_linear(module: nn.Module) -> None:
    """Truncated normal (std 0.02) on every linear layer, attention included, as the official code does last."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
