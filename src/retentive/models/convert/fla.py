"""flash-linear-attention's RetNet (``fla.models.RetNetForCausalLM``; fla-hub/retnet-1.3B-100B, -2.7B-100B).

Its math: RMSNorm block and final norms (with weights), q, k, v, g, o projections without biases, queries scaled by
dk^-1/2, rotary on halves (x_i, x_i+dk/2) at angles 10000^(-2i/dk), gamma_h = 1 - 2^(-5-h), no normalization of
the scores, an RMSNorm per head with one learnable weight (shared by the heads) fused with the swish gate, and a
SwiGLU FFN ``down(silu(gate x) * up x)``; older uploads hold one ``gate_proj`` of twice the width, [gate; up].
Options this layout may set that retentive lacks (short convolutions, feature maps, grouped keys, hybrid attention
layers, key widths other than d) are refused.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..configuration_retnet import RetNetConfig
from ._source import ConversionError, Source, Weights, token_ids
from ._target import _retention_keys, block_prefix, norm_keys

IGNORED = (r"rotary\.inv_freq$",)
UNSUPPORTED = {  # setting -> the value retentive supports
    "use_short_conv": False,
    "feature_map": None,
    "attn": None,
    "expand_k": 1,
    "attnres_block_size": None,
}


def convert_fla(source: Source, overrides: dict[str, Any]) -> tuple[RetNetConfig, dict[str, Tensor]]:
    """A flash-linear-attention RetNet folder (``config.json`` with ``hidden_size`` and ``expand_v``)."""
    settings = {"expand_v": 2, "hidden_act": "swish", "use_output_gate": True} | source.config | overrides
    eps = float(settings.get("norm_eps", settings.get("rms_norm_eps", 1e-6)))  # rms_norm_eps before 2024-04
    for name, supported in UNSUPPORTED.items():
        if settings.get(name, supported) != supported:
            raise ConversionError(
                f"{source.where}: {name}={settings[name]!r} is not supported by retentive (it needs {supported!r})"
            )
    num_kv_heads = settings.get("num_kv_heads")
    if num_kv_heads is not None and num_kv_heads != settings.get("num_heads"):
        raise ConversionError(f"{source.where}: num_kv_heads={num_kv_heads} (grouped keys) is not supported")
    if settings["hidden_act"] != "swish":
        raise ConversionError(f"{source.where}: hidden_act={settings['hidden_act']!r}: only 'swish' is supported")
    for name in ("num_heads", "num_hidden_layers"):
        if name not in settings:
            raise ConversionError(f"{source.where}: config.json lacks {name!r}: download the model's config.json")
    w = Weights(source, IGNORED)
    vocab_size, d = w.take("model.embeddings.weight").shape
    num_heads = int(settings["num_heads"])
    num_layers = w.layers(r"model\.layers\.(\d+)\.")
    if num_layers != settings["num_hidden_layers"]:
        raise ConversionError(
            f"{source.where}: {num_layers} layers in the weights but num_hidden_layers="
            f"{settings['num_hidden_layers']} in config.json"
        )
    gate = settings["use_output_gate"]
    head_norm = "model.layers.0.attn.g_norm_swish_gate.weight"
    head_norm = head_norm if w.has(head_norm) else "model.layers.0.attn.g_norm.weight"
    config = RetNetConfig(
        vocab_size=vocab_size,
        dim_model=d,
        num_layers=num_layers,
        num_heads=num_heads,
        ffn_dim=w.take("model.layers.0.mlp.down_proj.weight").shape[1],
        ffn_activation="swiglu",
        ffn_bias=False,
        gate_fn="swish" if gate else "none",
        head_norm="rmsnorm",
        decay="retnet",
        rotary=True,
        msr_bias=False,
        normalize_decay=False,
        normalize_retention=False,
        norm_eps=eps,
        tie_word_embeddings=bool(settings.get("tie_word_embeddings", False)),
        value_dim=int(d * settings["expand_v"]),
        norm="rmsnorm",
        head_norm_weight=w.has(head_norm),
        head_norm_eps=eps,
        rotary_layout="halves",
        rotary_angles="rope",
        **token_ids(settings, vocab_size),
    )
    state = _fla_state(w, config, gate)
    w.check_all_taken()
    return config, state


def _fla_state(w: Weights, config: RetNetConfig, gate: bool) -> dict[str, Tensor]:
    d, V, F_, H = config.dim_model, config.vocab_size, config.ffn_dim, config.num_heads
    dv = config.head_dims[1]
    state = {"model.embed_tokens.weight": w.take("model.embeddings.weight", (V, d))}
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", block_prefix(i)
        shapes = {"q": (d, d), "k": (d, d), "v": (H * dv, d), "o": (d, H * dv)} | ({"g": (H * dv, d)} if gate else {})
        proj = {n: w.take(f"{src}attn.{n}_proj.weight", s) for n, s in shapes.items()}
        state |= _retention_keys(f"{dst}.retention", proj["q"], proj["k"], proj["v"], proj.get("g"), proj["o"])
        if config.head_norm_weight:  # one (dv,) weight shared by the heads; ours is per channel
            name = "g_norm_swish_gate" if w.has(f"{src}attn.g_norm_swish_gate.weight") else "g_norm"
            state[f"{dst}.retention.head_norm.weight"] = w.take(f"{src}attn.{name}.weight", (dv,)).repeat(H)
        state |= norm_keys(f"{dst}.norm1", w.take(f"{src}attn_norm.weight", (d,)), None)
        state |= norm_keys(f"{dst}.norm2", w.take(f"{src}mlp_norm.weight", (d,)), None)
        if w.has(f"{src}mlp.up_proj.weight"):
            up, gate_w = w.take(f"{src}mlp.up_proj.weight", (F_, d)), w.take(f"{src}mlp.gate_proj.weight", (F_, d))
        else:  # older uploads: one gate_proj of twice the width, [gate; up]
            gate_w, up = w.take(f"{src}mlp.gate_proj.weight", (2 * F_, d)).chunk(2, dim=0)
        state[f"{dst}.ffn.gate.weight"], state[f"{dst}.ffn.up.weight"] = gate_w, up
        state[f"{dst}.ffn.down.weight"] = w.take(f"{src}mlp.down_proj.weight", (d, F_))
    state |= norm_keys("model.retnet.norm", w.take("model.norm.weight", (d,)), None)
    if config.tie_word_embeddings:
        w.left.discard("lm_head.weight")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    else:
        state["lm_head.weight"] = w.take("lm_head.weight", (V, d))
    return state
