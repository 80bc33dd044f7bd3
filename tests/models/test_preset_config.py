"""The vision configs: old names as aliases, the dict and folder round trips, presets and validation by field."""

import dataclasses

import pytest
from transformers import AutoConfig

from retentive.models import RMTConfig, ViRConfig

# (class, the earlier names, the same config in the library's names, (an alias, another value for it))
ALIASES = [
    (
        ViRConfig,
        dict(dim=32, depth=3, mlp_ratio=2.0, num_heads=4),
        dict(dim_model=32, num_layers=3, ffn_ratio=2.0, num_heads=4),
        ("dim", 64),
    ),
    (
        RMTConfig,
        dict(dims=(16, 32), depths=(1, 2), num_heads=(2, 2), heads_ranges=(4, 6), mlp_ratios=(2, 3)),
        dict(dim_model=(16, 32), num_layers=(1, 2), num_heads=(2, 2), heads_range=(4, 6), ffn_ratio=(2, 3)),
        ("dims", (32, 64)),
    ),
]
FEW_STAGES = dict(decomposed=(True, False), layer_scales=(False, True))


@pytest.mark.parametrize(("cls", "old", "new", "change"), ALIASES)
def test_earlier_names_are_aliases(cls, old, new, change):
    extra = FEW_STAGES if cls is RMTConfig else {}
    config = cls(**old, **extra)
    assert config.to_dict() == cls(**new, **extra).to_dict()
    assert all(getattr(config, name) == value for name, value in old.items())
    alias, value = change
    setattr(config, alias, value)
    assert config.dim_model == value and alias not in config.to_dict()
    assert cls(**{**config.to_dict(), "num_labels": 7}).num_classes == 7  # Hugging Face's name


@pytest.mark.parametrize("config", [ViRConfig.from_preset("vir-tiny"), RMTConfig.from_preset("rmt-tiny")])
def test_round_trips_through_a_dict_a_folder_and_replace(config, tmp_path):
    cls = type(config)
    again = cls(**config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    for loaded in (cls.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is cls and loaded.to_diff_dict() == config.to_diff_dict()
    if cls is RMTConfig:  # config.json holds lists; the per-stage fields come back as tuples
        assert again.dim_model == cls.from_pretrained(tmp_path).dim_model == (32, 64, 128)
    assert dataclasses.replace(config, num_classes=3).num_classes == 3


def test_presets_take_overrides_by_either_name_and_refuse_unknown_ones():
    assert ViRConfig.from_preset("vir-tiny", dim=128).dim_model == 128
    assert RMTConfig.from_preset("rmt-tiny", depths=(2, 2, 2)).num_layers == (2, 2, 2)
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['width'\]"):
        ViRConfig.from_preset("vir-tiny", width=3)
    with pytest.raises(ValueError, match=r"unknown preset 'rmt-xxl' of RMTConfig"):
        RMTConfig.from_preset("rmt-xxl")


@pytest.mark.parametrize(
    ("cls", "fields", "message"),
    [
        (ViRConfig, dict(dim=30, num_heads=4), r"dim_model \(30\) must be a multiple of num_heads"),
        (ViRConfig, dict(rotary=True, dim_model=20, num_heads=4), "rotary needs an even head dim"),
        (ViRConfig, dict(depth=0), "num_layers must be an integer >= 1"),
        (ViRConfig, dict(mlp_ratio=0.0), "ffn_ratio must be > 0"),
        (ViRConfig, dict(layer_scale=0.0), "layer_scale must be None"),
        (ViRConfig, dict(dropout=1.0), "dropout must lie in"),
        (RMTConfig, dict(depths=(1, 0, 1, 1)), r"num_layers\[1\] must be an integer >= 1"),
        (RMTConfig, dict(dims=(64, 128, 256, 500)), r"dim_model\[3\] \(500\) must be a multiple of num_heads\[3\]"),
        (RMTConfig, dict(heads_ranges=(4, -1, 6, 6)), "every heads_range >= 0"),
        (RMTConfig, dict(mlp_ratios=(3, 3, 0, 3)), "every ffn_ratio must be > 0"),
    ],
)
def test_bad_fields_are_refused_by_name(cls, fields, message):
    with pytest.raises(ValueError, match=message):
        cls(**fields)
