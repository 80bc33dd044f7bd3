"""RetNetConfig: presets and their parameter counts, validation, serialization."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from retentive import RetNetConfig, RetNetForCausalLM, RetNetModel
from retentive.models import PRESETS


def closed_form_parameters(cfg: RetNetConfig) -> int:
    """Parameters of RetNetForCausalLM counted from the config alone (SPEC §5), independently of the modules."""
    d, f, V = cfg.dim_model, cfg.ffn_dim, cfg.vocab_size
    dv = cfg.value_factor * d if cfg.value_dim is None else cfg.value_dim
    gated_ffn = cfg.ffn_activation in ("glu", "reglu", "geglu", "swiglu")
    norm = (2 if cfg.norm == "layernorm" else 1) * d  # LayerNorm: weight and bias; RMSNorm: weight
    retention = 2 * d * d + dv * d + dv * d * (cfg.gate_fn != "none") + dv * d  # W_Q, W_K, W_V, W_G, W_O
    retention += cfg.msr_bias * (2 * d + dv + dv * (cfg.gate_fn != "none") + d)
    retention += 2 * dv * (cfg.head_norm == "groupnorm") + dv * cfg.head_norm_weight  # head norm affine
    ffn = (2 + gated_ffn) * d * f + cfg.ffn_bias * ((1 + gated_ffn) * f + d)
    ffn += {"none": 0, "layernorm": 2 * f, "rmsnorm": f}[cfg.ffn_norm]
    layer = retention + ffn + 2 * norm  # two norms
    embeddings = V * d * (1 if cfg.tie_word_embeddings else 2) + cfg.embed_norm * norm
    return cfg.num_layers * layer + norm + embeddings  # + the final norm


def count_on_meta(cfg: RetNetConfig) -> int:
    with torch.device("meta"):
        model = RetNetForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_matches_closed_form(name: str) -> None:
    cfg = RetNetConfig.from_preset(name)
    assert count_on_meta(cfg) == closed_form_parameters(cfg)


def test_paper_presets_have_the_paper_shapes_and_12_d2_per_layer() -> None:
    """SPEC §5 table: head dims qk 256 / v 512 and 12 d^2 weights per layer (+ O(d) norms and biases)."""
    for name, (d, layers, heads) in {
        "retnet-1.3b": (2048, 24, 8),
        "retnet-2.7b": (2560, 32, 10),
        "retnet-6.7b": (4096, 32, 16),
    }.items():
        cfg = RetNetConfig.from_preset(name)
        assert (cfg.dim_model, cfg.num_layers, cfg.num_heads, cfg.ffn_dim) == (d, layers, heads, 2 * d)
        assert cfg.head_dims == (256, 512)
        non_embedding = closed_form_parameters(cfg) - cfg.vocab_size * d
        assert 12 * d * d * layers < non_embedding < 12 * d * d * layers + 20 * d * layers


def test_cpu_presets_sizes() -> None:
    millions = {name: count_on_meta(RetNetConfig.from_preset(name)) / 1e6 for name in ("retnet-tiny", "retnet-small")}
    assert 2 < millions["retnet-tiny"] < 8
    assert 20 < millions["retnet-small"] < 30
    assert 110 < count_on_meta(RetNetConfig.from_preset("retnet-base")) / 1e6 < 140


@pytest.mark.parametrize(
    "overrides",
    [
        dict(ffn_activation="swiglu", ffn_bias=False),
        dict(gate_fn="none", head_norm="rmsnorm", msr_bias=True),
        dict(tie_word_embeddings=False, value_factor=1, ffn_dim=48),
        dict(norm="rmsnorm", value_dim=36, ffn_activation="reglu", ffn_norm="layernorm", embed_norm=True),
        dict(head_norm="rmsnorm", head_norm_weight=True, ffn_norm="rmsnorm", embed_norm=True, scale_embedding=True),
    ],
)
def test_options_parameter_count_matches_closed_form(overrides: dict) -> None:
    cfg = RetNetConfig(vocab_size=50, dim_model=32, num_layers=2, num_heads=4, **overrides)
    model = RetNetForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == closed_form_parameters(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim_model=30, num_heads=4), "multiple of num_heads"),
        (dict(dim_model=24, num_heads=8), "even head dim"),
        (dict(gate_fn="tanh"), "gate_fn"),
        (dict(ffn_activation="mish"), "ffn_activation"),
        (dict(head_norm="batchnorm"), "head_norm"),
        (dict(mode="fast"), "mode"),
        (dict(decay="cosine"), "decay"),
        (dict(decay=[0.9, 1.0, 0.5, 0.5]), "decay"),
        (dict(num_layers=0), "num_layers"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(eos_token_id=4096), "eos_token_id"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(value_dim=30), "value_dim must be None"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(ffn_norm="groupnorm"), "ffn_norm must be one of"),
        (dict(head_norm_weight=True), "head_norm_weight=True needs head_norm 'rmsnorm' or 'layernorm'"),
        (dict(head_norm_eps=0.0), "head_norm_eps must be > 0"),
        (dict(rotary_layout="pairs"), "rotary_layout must be one of"),
        (dict(rotary_angles="xpos"), "rotary_angles must be one of"),
        (dict(rotary_base=1.0), "rotary_base must be > 1"),
    ],
)
def test_bad_config_is_refused_with_a_message(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetNetConfig(**{"vocab_size": 4096, **overrides})


def test_odd_head_dim_works_without_rotary() -> None:
    cfg = RetNetConfig(dim_model=24, num_heads=8, rotary=False)
    assert cfg.head_dims == (3, 6)


def test_from_preset_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        RetNetConfig.from_preset("retnet-7b")
    with pytest.raises(ValueError, match="num_head"):
        RetNetConfig.from_preset("retnet-tiny", num_head=8)


def test_config_round_trip_aliases_and_auto_classes(tmp_path) -> None:
    cfg = RetNetConfig.from_preset("retnet-tiny", decay=[0.9, 0.95, 0.99, 0.999], eos_token_id=3)
    small = RetNetConfig(vocab_size=50, dim_model=16, num_layers=1, num_heads=2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (256, 4, 4)
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RetNetConfig)
    assert loaded.to_diff_dict() == cfg.to_diff_dict()
    assert isinstance(AutoModel.from_config(small), RetNetModel)
    assert isinstance(AutoModelForCausalLM.from_config(small), RetNetForCausalLM)


@pytest.mark.parametrize(
    ("overrides", "ffn_dim"),
    [
        (dict(dim_model=64), 128),  # the width changes: the FFN follows (2d), not the preset's 512
        (dict(hidden_size=64), 128),  # the alias too
        (dict(dim_model=64, ffn_dim=96), 96),  # given: kept
        (dict(hidden_size=64, intermediate_size=96), 96),
        (dict(num_layers=2), 512),  # the width unchanged: the preset's FFN
    ],
)
def test_overriding_the_width_derives_the_ffn_width_unless_it_is_given(overrides, ffn_dim, tmp_path) -> None:
    from retentive.data import ByteTokenizer
    from retentive.training.lm import LMConfig, build_model_config

    assert RetNetConfig.from_preset("retnet-tiny", **overrides).ffn_dim == ffn_dim
    RetNetConfig.from_preset("retnet-tiny").save_pretrained(tmp_path)  # `retentive train --config` with --set
    lm = LMConfig(model_config=str(tmp_path / "config.json"), model_overrides=overrides)
    assert build_model_config(lm, ByteTokenizer()).ffn_dim == ffn_dim


def test_the_seed_names_of_the_normalizations_are_aliases(tmp_path) -> None:
    """normalize_attn / normalize_retn (the seed repository's, and older config.json files') reach the fields."""
    cfg = RetNetConfig(normalize_attn=True)
    assert cfg.normalize_decay and cfg.normalize_attn and not cfg.normalize_retention
    old = RetNetConfig.from_preset("retnet-tiny").to_dict() | {"normalize_retn": True}
    del old["normalize_retention"]
    assert RetNetConfig(**old).normalize_retention
    cfg.save_pretrained(tmp_path)
    assert '"normalize_decay": true' in (tmp_path / "config.json").read_text()


def test_an_alias_of_the_width_derives_the_ffn_width_too() -> None:
    assert RetNetConfig(hidden_size=512).ffn_dim == 1024
    assert RetNetConfig(hidden_size=512, intermediate_size=96).ffn_dim == 96
