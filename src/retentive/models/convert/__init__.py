"""Convert the public RetNet checkpoints into retentive's :class:`RetNetForCausalLM`, and the official RMT's into
:class:`RMTForImageClassification`.

Four layouts: ``torchscale`` (torchscale / fairseq ``.pt``, both generations) and ``hf-retnet`` (the Hugging Face
layout of syncdoth/RetNet, which copies torchscale's modules) in :mod:`.torchscale`, ``fla`` (flash-linear-attention's
RetNet) in :mod:`.fla`, ``rmt`` (qhfan/RMT's classification checkpoints) in :mod:`.rmt`. Each maps the source's
tensors onto retentive's keys (the retention projections through one function, ``_target._retention_keys``) and its
settings onto a config whose options reproduce its math, so that the converted model gives the source's logits (for
the language models, in each of retentive's three forms).

    config, state, source = convert("path/to/checkpoint")    # the layout is detected
    convert_checkpoint("path/to/checkpoint", "out/")          # a save_pretrained folder (+ tokenizer files)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..configuration_retnet import RetNetConfig
from ..rmt import RMTConfig
from ._source import ConversionError, Source, copy_tokenizer, read_source
from .fla import convert_fla
from .rmt import convert_rmt
from .torchscale import convert_hf_retnet, convert_torchscale

Converter = Callable[[Source, dict[str, Any]], tuple[RetNetConfig | RMTConfig, dict[str, Tensor]]]
LAYOUTS: dict[str, Converter] = {
    "torchscale": convert_torchscale,
    "hf-retnet": convert_hf_retnet,
    "fla": convert_fla,
    "rmt": convert_rmt,
}

__all__ = ["LAYOUTS", "ConversionError", "build", "convert", "convert_checkpoint", "detect_layout", "foreign_layout"]


def foreign_layout(config: dict[str, Any], keys: set[str] | list[str]) -> str | None:
    """The layout of a source with these tensor names (or, without them, this configuration), or None for
    retentive's own checkpoints and unknown ones."""
    keys = set(keys)
    if "model.layers.0.attn.q_proj.weight" in keys:
        return "fla"
    if "model.layers.0.retention.q_proj.weight" in keys:
        return "hf-retnet"
    if {"layers.0.retention.q_proj.weight", "decoder.layers.0.retention.q_proj.weight"} & keys:
        return "torchscale"
    if "layers.0.blocks.0.retention.q_proj.weight" in keys and "patch_embed.proj.0.weight" in keys:
        return "rmt"
    if keys or "dim_model" in config:
        return None  # retentive's own, or unknown
    if "decoder_embed_dim" in config:
        return "hf-retnet"
    if "hidden_size" in config and ("expand_v" in config or "attn_mode" in config):
        return "fla"
    return None


def detect_layout(source: Source) -> str:
    """The layout of a read source; ConversionError naming the file if it is none of ``LAYOUTS``."""
    layout = foreign_layout(source.config, source.state.keys())
    if layout is None:
        sample = sorted(source.state)[:5]
        raise ConversionError(
            f"{source.where}: unknown checkpoint layout (keys such as {sample}): retentive converts "
            f"{tuple(LAYOUTS)}; name one with --from if the detection missed it, or load a retentive folder with "
            "RetNetForCausalLM.from_pretrained"
        )
    return layout


def convert(
    path: str | Path, layout: str | None = None, source_config: dict[str, Any] | None = None
) -> tuple[RetNetConfig | RMTConfig, dict[str, Tensor], Source]:
    """Read the checkpoint at ``path`` and convert it.

    Args:
        path: a checkpoint file or folder.
        layout: one of ``LAYOUTS``, or None to detect it.
        source_config: the source's own settings, over those the checkpoint carries (e.g. a torchscale ``.pt``
            without its fairseq ``cfg``: ``{"activation_fn": "swish", "no_scale_embedding": False}``).
    Returns:
        The config, retentive's state dict (tensors in the source's dtype) and the read source.
    """
    source = read_source(path)
    layout = detect_layout(source) if layout is None else layout
    if layout not in LAYOUTS:
        raise ConversionError(f"{path}: unknown layout {layout!r}: choose one of {tuple(LAYOUTS)}")
    config, state = LAYOUTS[layout](source, dict(source_config or {}))
    return config, state, source


def build(config: RetNetConfig | RMTConfig, state: dict[str, Tensor], source: Source, dtype: torch.dtype | None = None):
    """A :class:`RetNetForCausalLM` (or, for an RMT config, an :class:`RMTForImageClassification`) holding
    ``state``, in ``dtype`` (None: the source's floating dtype)."""
    from ..modeling_retnet import RetNetForCausalLM
    from ..rmt import RMTForImageClassification

    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    if isinstance(config, RMTConfig):
        model = RMTForImageClassification(config, device="meta").to_empty(device="cpu")
        model.load_state_dict(state, strict=True)  # BatchNorm's integer counters stay integers; a bug if it fails
        return model.to(dtype).eval()
    with torch.device("meta"):
        model = RetNetForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:  # a bug of a mapping, not of the checkpoint
        raise ConversionError(f"{source.where}: conversion left {missing} unset and {unexpected} unused")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    layout: str | None = None,
    source_config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Convert ``src`` and write a ``save_pretrained`` folder at ``out`` (config.json, model.safetensors, and the
    tokenizer files ``src`` has; for RMT, ``preprocessor_config.json``: the official evaluation's preprocessing, and
    what the image-classification pipeline needs, see :meth:`ImageClassifier.save_pretrained`).
    Returns ``out``."""
    config, state, source = convert(src, layout, source_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build(config, state, source, dtype).save_pretrained(out)
    copy_tokenizer(source, out)
    return out
