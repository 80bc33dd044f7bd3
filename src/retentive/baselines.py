"""The Transformer baseline: Hugging Face ``LlamaForCausalLM`` sized to match a RetNet.

The baseline is the implementation users already trust (SDPA attention, rotary positions, KV cache),
configured with the RetNet's width d, depth, heads and vocabulary; only the MLP width is solved so that
the parameter counts agree (within 2%, in practice within a few hundred parameters).

    >>> from retentive.baselines import model_from_preset
    >>> model = model_from_preset("transformer-tiny")   # mirrors retnet-tiny; "retnet-tiny" gives the RetNet
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

PREFIX = "transformer-"


def count_parameters(model: nn.Module) -> int:
    """The number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def llama_config_matching(
    dim_model: int,
    num_layers: int,
    num_heads: int,
    vocab_size: int,
    target_params: int,
    *,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 65536,
) -> LlamaConfig:
    """A Llama config with the given d, layers, heads and vocabulary whose size is ``target_params``.

    A Llama layer holds 4d² (attention) + 3·d·F (SwiGLU MLP of width F) + 2d (RMSNorms); F is solved for.

    Args:
        dim_model: d, the hidden size.
        num_layers: the number of decoder layers.
        num_heads: attention heads (as many key-value heads: plain multi-head attention).
        vocab_size: the vocabulary size.
        target_params: the parameter count to match (the RetNet's).
        tie_word_embeddings: share the input embedding and the output head.
        max_position_embeddings: the longest context the rotary cache is sized for.

    Returns:
        A ``LlamaConfig`` using SDPA attention.
    """
    for name, value in (("dim_model", dim_model), ("num_layers", num_layers), ("num_heads", num_heads)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if dim_model % num_heads:
        raise ValueError(f"dim_model ({dim_model}) must be divisible by num_heads ({num_heads})")
    embeddings = vocab_size * dim_model * (1 if tie_word_embeddings else 2)
    fixed = embeddings + dim_model + num_layers * (4 * dim_model**2 + 2 * dim_model)
    intermediate_size = round((target_params - fixed) / (3 * dim_model * num_layers))
    if intermediate_size < 1:
        raise ValueError(
            f"target_params={target_params:,} is too small for d={dim_model}, {num_layers} layers and a vocabulary of "
            f"{vocab_size} ({fixed:,} parameters before the MLP): raise target_params"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim_model,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="sdpa",
    )


def transformer_matching(model: nn.Module, dim_model: int, num_layers: int, num_heads: int, vocab_size: int, **kw):
    """A ``LlamaForCausalLM`` with the same d, layers, heads, vocabulary and parameter count as ``model``."""
    config = llama_config_matching(dim_model, num_layers, num_heads, vocab_size, count_parameters(model), **kw)
    return LlamaForCausalLM(config)


def transformer_presets() -> tuple[str, ...]:
    """The baseline presets, one per RetNet preset: ``transformer-tiny``, ``transformer-small``, ..."""
    from .models import PRESETS

    return tuple(PREFIX + name.removeprefix("retnet-") for name in PRESETS)


def retnet_preset_for(name: str) -> str:
    """The RetNet preset a baseline preset mirrors: ``"transformer-tiny"`` -> ``"retnet-tiny"``."""
    if not name.startswith(PREFIX):
        raise ValueError(f"a Transformer preset starts with {PREFIX!r} (e.g. 'transformer-tiny'), got {name!r}")
    return "retnet-" + name.removeprefix(PREFIX)


def transformer_config_from_preset(name: str, **overrides) -> LlamaConfig:
    """The ``LlamaConfig`` of ``transformer-<size>``: the twin of ``RetNetConfig.from_preset("retnet-<size>")``.

    Args:
        name: ``"transformer-<size>"`` for each RetNet preset ``"retnet-<size>"``.
        overrides: RetNetConfig fields changed before matching (e.g. ``vocab_size`` of a trained tokenizer),
            so that the twin of the changed RetNet is built.
    """
    from .models import RetNetConfig, RetNetForCausalLM

    cfg = RetNetConfig.from_preset(retnet_preset_for(name), **overrides)
    with torch.device("meta"):
        target = count_parameters(RetNetForCausalLM(cfg))
    config = llama_config_matching(
        cfg.dim_model,
        cfg.num_layers,
        cfg.num_heads,
        cfg.vocab_size,
        target,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id
    return config


def transformer_from_preset(name: str, **overrides) -> LlamaForCausalLM:
    """A freshly initialized ``LlamaForCausalLM`` for ``transformer-<size>`` (overrides: RetNetConfig fields).

    Its token embedding (and an untied head) start as the RetNet's, N(0, d^-1/2) unless ``embedding_init_std`` says
    otherwise, not at Llama's 0.02: measured, the twin gains as much from it as the RetNet does (docs/benchmarks.md,
    "Learning rate"), so neither model is compared at a handicap.
    """
    from .models import RetNetConfig

    model = LlamaForCausalLM(transformer_config_from_preset(name, **overrides))
    cfg = RetNetConfig.from_preset(retnet_preset_for(name), **overrides)
    std = cfg.dim_model**-0.5 if cfg.embedding_init_std is None else cfg.embedding_init_std
    with torch.no_grad():
        for weight in {id(w): w for w in (model.get_input_embeddings().weight, model.lm_head.weight)}.values():
            weight.normal_(0.0, std)
    return model


def model_from_preset(name: str, **overrides) -> nn.Module:
    """A fresh causal LM for any preset: ``retnet-*`` (RetNetForCausalLM) or ``transformer-*`` (its Llama twin).

    ``overrides`` are RetNetConfig fields (``vocab_size=...``); a Transformer is matched to the changed RetNet.

    Both take ``model(input_ids=..., labels=...)`` and return ``.loss`` and ``.logits``, so one trainer trains either.
    """
    if name.startswith(PREFIX):
        return transformer_from_preset(name, **overrides)
    from .models import RetNetConfig, RetNetForCausalLM

    return RetNetForCausalLM(RetNetConfig.from_preset(name, **overrides))
