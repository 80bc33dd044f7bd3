"""The official RMT code (qhfan/RMT, ``classfication_release/RMT.py``, June 2024): RMT_T3, RMT_S, RMT_M2, RMT_L6.

Its checkpoints are ``.pth`` dicts whose ``model`` (or ``model_ema``) entry is the state dict of its ``VisRetNet``.
The layout is retentive's RMT under other names: ``patch_embed`` is the stem, ``layers.i`` stage i (its ``Relpos``
buffers, the log-gammas and rotary angles, are recomputed from the config), ``retention_layer_norm`` /
``final_layer_norm`` the block norms, ``retention.lepe`` the LCE, ``pos`` the CPE, ``gamma_1`` / ``gamma_2``
(1, 1, 1, C) the layer scales, ``norm`` a BatchNorm2d over (B, C, h, w) where ours is a BatchNorm1d over (B, C, h*w)
(the same statistics). The weights do not say which stages are decomposed (MaSAD and MaSA have the same
parameters): that comes from the named model whose widths and depths the weights have, or from the source config's
``decomposed``. The token-labelled models' extra ``aux_head`` is refused: retentive has no dense head.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import Tensor

from ..rmt import RMT_PRESETS, RMTConfig
from ._source import ConversionError, Source, Weights

# the recomputable buffers, dropped
IGNORED = (r"\.Relpos\.(angle|decay)$",)
# official name (regex) -> retentive's, for every key whose tensor keeps its shape
RENAMES = (
    (r"^patch_embed\.proj\.", "stem.proj."),
    (r"^layers\.(\d+)\.", r"stages.\1."),
    (r"\.retention_layer_norm\.", ".norm1."),
    (r"\.final_layer_norm\.", ".norm2."),
    (r"\.retention\.lepe\.", ".attn.lce."),
    (r"\.retention\.", ".attn."),
    (r"\.pos\.conv\.", ".cpe.conv."),
)
NAMED = ("rmt-t", "rmt-s", "rmt-b", "rmt-l")


def rename(key: str) -> str:
    """An official key -> retentive's (``gamma_1`` / ``gamma_2`` -> ``ls1.weight`` / ``ls2.weight``)."""
    for pattern, replacement in RENAMES:
        key = re.sub(pattern, replacement, key)
    return re.sub(r"\.gamma_([12])$", r".ls\1.weight", key)


def convert_rmt(source: Source, overrides: dict[str, Any]) -> tuple[RMTConfig, dict[str, Tensor]]:
    """An official RMT state dict (from ``.pth``'s ``model``) -> (RMTConfig, retentive's state dict)."""
    if any(k.startswith("aux_head.") for k in source.state):
        raise ConversionError(
            f"{source.where}: 'aux_head.weight' is the token-labelling dense head of the official "
            "classification_token_label_release model, which retentive's RMT does not have: drop the aux_head "
            "entries to convert the classifier alone (its logits then differ from the official evaluation's)"
        )
    w = Weights(source, IGNORED)
    num_stages = w.layers(r"layers\.(\d+)\.")
    dims, depths, ffn_ratio, heads, gammas = [], [], [], [], []
    for i in range(num_stages):
        depth = w.layers(rf"layers\.{i}\.blocks\.(\d+)\.")
        dim = w.source.state[f"layers.{i}.blocks.0.retention.q_proj.weight"].shape[0]
        ffn_dim = w.source.state[f"layers.{i}.blocks.0.ffn.fc1.weight"].shape[0]
        dims.append(dim)
        depths.append(depth)
        ffn_ratio.append(ffn_dim / dim)
        decay = source.state.get(f"layers.{i}.Relpos.decay")
        heads.append(None if decay is None else decay.numel())
        gammas.append(decay)
    named = _named(dims, depths)
    fields = dict(RMT_PRESETS[named]) if named else {}
    if None in heads and not named and "num_heads" not in overrides:
        raise ConversionError(
            f"{source.where}: the 'layers.i.Relpos.decay' buffers are missing and the widths {dims} / depths "
            f"{depths} are none of {NAMED}: give num_heads (and heads_range, initial_value) in the source config"
        )
    if None not in heads:
        fields["num_heads"] = tuple(heads)
        fields["initial_value"], fields["heads_range"] = _decay_fields(source, gammas)
    if not named and "decomposed" not in overrides:
        raise ConversionError(
            f"{source.where}: widths {dims} and depths {depths} are none of {NAMED}, and the weights do not say "
            "which stages are decomposed (MaSAD): give decomposed (one bool per stage) in the source config"
        )
    state = source.state
    fields |= dict(
        in_channels=state["patch_embed.proj.0.weight"].shape[1],
        num_classes=state["head.weight"].shape[0],
        dim_model=tuple(dims),
        num_layers=tuple(depths),
        ffn_ratio=tuple(ffn_ratio),
        layer_scales=tuple(f"layers.{i}.blocks.0.gamma_1" in state for i in range(num_stages)),
        projection=state["proj.weight"].shape[0],
    )
    config = RMTConfig(**(fields | overrides))
    out = {}
    for key in sorted(w.left):
        tensor = w.take(key)
        out[rename(key)] = tensor.flatten() if re.search(r"\.gamma_[12]$", key) else tensor
    w.check_all_taken()
    return config, out


def _named(dims: list[int], depths: list[int]) -> str | None:
    """The named RMT with these widths and depths, or None."""
    for name in NAMED:
        config = RMTConfig.from_preset(name)
        if list(config.dim_model) == dims and list(config.num_layers) == depths:
            return name
    return None


def _decay_fields(source: Source, gammas: list[Tensor]) -> tuple[float, tuple[float, ...]]:
    """initial_value and heads_range per stage from the stored log-gammas ln(1 - 2^-(a + r h / H)), h = 0..H-1."""
    initial, ranges = set(), []
    for decay in gammas:
        exponent = [-math.log2(1 - math.exp(x)) for x in decay.double().tolist()]  # a + r h / H
        initial.add(round(exponent[0], 4))
        step = exponent[1] - exponent[0] if len(exponent) > 1 else 0.0
        ranges.append(round(step * len(exponent), 4))
    if len(initial) != 1:
        raise ConversionError(
            f"{source.where}: the stages' decays start at different initial values {sorted(initial)}; retentive's "
            "RMT has one initial_value for every stage"
        )
    return initial.pop(), tuple(ranges)
