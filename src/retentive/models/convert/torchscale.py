"""torchscale / fairseq RetNet checkpoints, and the Hugging Face layout of syncdoth/RetNet that copies their modules.

Both generations of torchscale's ``RetNetDecoder`` are read; the weights tell them apart:

- before 2023-09-28: LayerNorm block norms (with biases), biases in the retention projections, a LayerNorm per head
  (eps 1e-6, no affine), a plain FFN (``fc1``, ``fc2``, with biases) with an optional sub-LayerNorm (``subln``);
- from 2023-09-28 (torchscale 0.3.0): RMSNorm block norms, no biases, ``decoder_value_embed_dim``, an RMSNorm per
  head (no weight), a GLU FFN ``fc2(act(fc1 x) * gate x)``.

Common to both: keys scaled by dk^-1/2 (equal to scaling the scores), interleaved rotary with angles
10000^(-linspace(0, 1, dk/2)), gamma_h = 1 - 2^(-5-h), both normalizations of the parallel form (decay and
retention), an optional sqrt(d) embedding scale and embedding norm. syncdoth/RetNet is the later generation with
RMSNorm everywhere, keys under ``model.`` and ``lm_head``, and an optional ``use_lm_decay`` (the linspace schedule).

Two departures of the sources from exactness, which retentive does not copy: torchscale's recurrent form omits the
retention normalization of its parallel form, and syncdoth/RetNet (from 2024-01, as torchscale after 0.3.0) divides
the parallel scores by the sum of their absolute values, clamped to [1, 5e4], which has no recurrent form. retentive
uses torchscale 0.3.0's |sum of the scores|, exact in every form. Each divides a head's output row by a positive
number, which the per-head norm that follows removes except through its eps: the choices differ only where
mean(o^2) is comparable to eps * c^2.

The settings the weights do not show (activation, embedding scale, eps, tied head) come from the checkpoint's own
configuration (``cfg``/``args`` of a fairseq checkpoint, ``config.json`` of a Hugging Face folder), else from the
source's defaults, and ``overrides`` (the CLI's ``--source-config``) win over both.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from torch import Tensor

from ..configuration_retnet import RetNetConfig
from ._source import ConversionError, Source, Weights, match_schedule, token_ids
from ._target import _retention_keys, block_prefix, norm_keys

logger = logging.getLogger(__name__)

GLU_ACTIVATIONS = {"gelu": "geglu", "swish": "swiglu", "relu": "reglu"}
PLAIN_ACTIVATIONS = {"gelu": "gelu", "swish": "swish", "relu": "relu"}
# buffers recomputed from the configuration (checked below), and fairseq's bookkeeping
IGNORED = (r"retnet_rel_pos\.(angle|decay)$", r"\.version$", r"_float_tensor$")


def convert_torchscale(source: Source, overrides: dict[str, Any]) -> tuple[RetNetConfig, dict[str, Tensor]]:
    """A torchscale ``RetNetDecoder`` state dict (bare, or fairseq's with keys under ``decoder.``)."""
    prefix = "decoder." if any(k.startswith("decoder.") for k in source.state) else ""
    weights = Weights(source, IGNORED)
    old = weights.has(prefix + "layers.0.retention_layer_norm.bias")  # LayerNorm: before 2023-09-28
    defaults = {
        "activation_fn": "gelu",
        "no_scale_embedding": True,
        "layernorm_eps": 1e-5 if old else 1e-6,
        "share_decoder_input_output_embed": False,
    }
    settings = _settings(source, defaults, overrides)
    return _convert_decoder(
        weights,
        settings,
        prefix,
        head_norm="layernorm" if old else "rmsnorm",
        head_norm_eps=1e-6 if old else settings["layernorm_eps"],
        head=prefix + "output_projection.weight",
        tied=bool(settings["share_decoder_input_output_embed"]),
        decay="retnet",
    )


def convert_hf_retnet(source: Source, overrides: dict[str, Any]) -> tuple[RetNetConfig, dict[str, Tensor]]:
    """A syncdoth/RetNet ``RetNetForCausalLM`` folder (``config.json`` with ``decoder_embed_dim``)."""
    defaults = {
        "activation_fn": "gelu",
        "no_scale_embedding": True,
        "layernorm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_lm_decay": False,
        "use_glu": True,
    }
    settings = _settings(source, defaults, overrides)
    if settings.get("deepnorm") or settings.get("decoder_normalize_before") is False:
        raise ConversionError(f"{source.where}: deepnorm / post-norm RetNets are not supported by retentive")
    return _convert_decoder(
        Weights(source, IGNORED),
        settings,
        "model.",
        head_norm="rmsnorm",
        head_norm_eps=settings["layernorm_eps"],
        head="lm_head.weight",
        tied=bool(settings["tie_word_embeddings"]),
        decay="linspace" if settings["use_lm_decay"] else "retnet",
    )


def _settings(source: Source, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    settings = {**defaults, **{k: v for k, v in source.config.items() if v is not None}, **overrides}
    if assumed := {k: v for k, v in defaults.items() if k not in source.config and k not in overrides}:
        logger.info("%s: settings not in the checkpoint, taken at the source's defaults: %s", source.where, assumed)
    if settings.get("multiway") or settings.get("moe_freq") or settings.get("deepnorm"):
        raise ConversionError(
            f"{source.where}: multiway, mixture-of-experts and deepnorm RetNets are not supported by retentive"
        )
    return settings


def _convert_decoder(
    w: Weights,
    settings: dict[str, Any],
    prefix: str,
    *,
    head_norm: str,
    head_norm_eps: float,
    head: str,
    tied: bool,
    decay: str,
) -> tuple[RetNetConfig, dict[str, Tensor]]:
    """The decoder layout shared by torchscale and syncdoth/RetNet, its keys under ``prefix``; ``head``: the key of
    the output layer."""
    where, p = w.source.where, prefix
    vocab_size, d = w.take(p + "embed_tokens.weight").shape
    num_layers = w.layers(re.escape(p) + r"layers\.(\d+)\.")
    num_heads = _num_heads(w, settings, p)
    value_dim = w.take(p + "layers.0.retention.v_proj.weight").shape[0]
    glu = w.has(p + "layers.0.ffn.gate.weight")
    ffn_dim = w.take(p + "layers.0.ffn.fc1.weight").shape[0]
    rms = not w.has(p + "layers.0.retention_layer_norm.bias")
    bias = w.has(p + "layers.0.retention.q_proj.bias")
    ffn_norm = "none"
    if w.has(p + "layers.0.ffn.ffn_layernorm.weight"):
        ffn_norm = "layernorm" if w.has(p + "layers.0.ffn.ffn_layernorm.bias") else "rmsnorm"
    if not w.has(p + "layer_norm.weight"):
        raise ConversionError(f"{where}: no final norm ({p}layer_norm.weight): post-norm RetNets are not supported")
    activations = GLU_ACTIVATIONS if glu else PLAIN_ACTIVATIONS
    if settings["activation_fn"] not in activations:
        raise ConversionError(
            f"{where}: activation_fn {settings['activation_fn']!r} is not one of {tuple(activations)} "
            "(fix it with --source-config)"
        )
    if w.has(p + "retnet_rel_pos.decay"):
        decay = match_schedule(w.source.state[p + "retnet_rel_pos.decay"], num_heads)
    config = RetNetConfig(
        vocab_size=vocab_size,
        dim_model=d,
        num_layers=num_layers,
        num_heads=num_heads,
        ffn_dim=ffn_dim,
        ffn_activation=activations[settings["activation_fn"]],
        ffn_bias=w.has(p + "layers.0.ffn.fc1.bias"),
        gate_fn="swish",
        head_norm=head_norm,
        decay=decay,
        msr_bias=bias,
        normalize_decay=True,
        normalize_retention=True,
        norm_eps=float(settings["layernorm_eps"]),
        tie_word_embeddings=tied,
        value_dim=None if value_dim == 2 * d else value_dim,
        norm="rmsnorm" if rms else "layernorm",
        ffn_norm=ffn_norm,
        head_norm_eps=float(head_norm_eps),
        scale_embedding=not settings["no_scale_embedding"],
        embed_norm=w.has(p + "layernorm_embedding.weight"),
        **token_ids(settings, vocab_size),
    )
    _check_angles(w, config, p)
    state = _decoder_state(w, config, p, glu, head, tied)
    w.check_all_taken()
    return config, state


def _num_heads(w: Weights, settings: dict[str, Any], prefix: str) -> int:
    """H: the length of the stored decays, else the configuration's ``decoder_retention_heads``."""
    if w.has(prefix + "retnet_rel_pos.decay"):
        return w.source.state[prefix + "retnet_rel_pos.decay"].numel()
    if "decoder_retention_heads" in settings:
        return int(settings["decoder_retention_heads"])
    raise ConversionError(
        f"{w.source.where}: the number of retention heads is neither stored ({prefix}retnet_rel_pos.decay) nor "
        'configured: pass it, e.g. --source-config with {"decoder_retention_heads": 8}'
    )


def _check_angles(w: Weights, config: RetNetConfig, prefix: str) -> None:
    """The stored rotary angles (each repeated for its pair) must be those the config computes."""
    key = prefix + "retnet_rel_pos.angle"
    if key not in w.source.state:
        return
    from ...ops import rotary_angles

    dk = config.head_dims[0]
    want = rotary_angles(dk).repeat_interleave(2).float()
    stored = w.source.state[key].float()
    if stored.shape != want.shape or not stored.allclose(want, rtol=1e-5, atol=0):
        raise ConversionError(
            f"{w.source.where}: {key!r} holds rotary angles that are not 10000^(-linspace(0, 1, dk/2)) for "
            f"dk = {dk}: this rotary is not supported"
        )


def _decoder_state(w: Weights, config: RetNetConfig, p: str, glu: bool, head: str, tied: bool) -> dict[str, Tensor]:
    d, V, F_ = config.dim_model, config.vocab_size, config.ffn_dim
    dv_all = config.head_dims[1] * config.num_heads
    state = {"model.embed_tokens.weight": w.take(p + "embed_tokens.weight", (V, d))}
    if config.embed_norm:
        state |= _norm(w, p + "layernorm_embedding", "model.embed_norm", d, config.norm)
    for i in range(config.num_layers):
        src, dst = f"{p}layers.{i}.", block_prefix(i)
        shapes = {"q": (d, d), "k": (d, d), "v": (dv_all, d), "g": (dv_all, d), "out": (d, dv_all)}
        proj = {n: w.take(f"{src}retention.{n}_proj.weight", s) for n, s in shapes.items()}
        state |= _retention_keys(f"{dst}.retention", proj["q"], proj["k"], proj["v"], proj["g"], proj["out"])
        if config.msr_bias:
            b = {n: w.take(f"{src}retention.{n}_proj.bias", s[:1]) for n, s in shapes.items()}
            state |= _retention_keys(f"{dst}.retention", b["q"], b["k"], b["v"], b["g"], b["out"], suffix="bias")
        state |= _norm(w, f"{src}retention_layer_norm", f"{dst}.norm1", d, config.norm)
        state |= _norm(w, f"{src}final_layer_norm", f"{dst}.norm2", d, config.norm)
        # torchscale's GLU is fc2(act(fc1 x) * gate x): its fc1 is our activated W_gate, its "gate" our W_up
        names = {"fc1": "gate", "gate": "up", "fc2": "down"} if glu else {"fc1": "up", "fc2": "down"}
        for theirs, ours in names.items():
            shape = (d, F_) if theirs == "fc2" else (F_, d)
            state[f"{dst}.ffn.{ours}.weight"] = w.take(f"{src}ffn.{theirs}.weight", shape)
            if config.ffn_bias:
                state[f"{dst}.ffn.{ours}.bias"] = w.take(f"{src}ffn.{theirs}.bias", shape[:1])
        if config.ffn_norm != "none":
            state |= _norm(w, f"{src}ffn.ffn_layernorm", f"{dst}.ffn.norm", F_, config.ffn_norm)
    state |= _norm(w, p + "layer_norm", "model.retnet.norm", d, config.norm)
    if tied:
        w.left.discard(head)  # fairseq stores the shared matrix under both names
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    else:
        state["lm_head.weight"] = w.take(head, (V, d))
    return state


def _norm(w: Weights, src: str, dst: str, dim: int, kind: str) -> dict[str, Tensor]:
    weight = w.take(f"{src}.weight", (dim,))
    return norm_keys(dst, weight, w.take(f"{src}.bias", (dim,)) if kind == "layernorm" else None)
