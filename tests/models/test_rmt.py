"""RMT: official parameter counts, the per-stage MaSA/MaSAD switch, odd and non-square images."""

import pytest
import torch

from retentive.models import RMTConfig, RMTForImageClassification

SMALL = RMTConfig(
    in_channels=2,
    num_classes=7,
    dims=(16, 32, 64),
    depths=(1, 1, 1),
    num_heads=(2, 2, 4),
    heads_ranges=(4, 4, 6),
    mlp_ratios=(2, 2, 2),
    decomposed=(True, False, False),
    layer_scales=(False, True, True),
    projection=48,
)


@pytest.mark.parametrize(
    ("name", "n_params"),
    [("rmt-t", 14_334_216), ("rmt-s", 26_967_240), ("rmt-b", 54_154_896), ("rmt-l", 95_464_864)],
)
def test_official_parameter_counts(name, n_params):
    model = RMTForImageClassification(RMTConfig.from_preset(name), device="meta")
    assert model.num_parameters() == n_params


def test_stages_switch_between_masad_and_masa_and_gammas_by_stage():
    model = RMTForImageClassification(SMALL)
    for stage, decomposed, rng in zip(model.stages, SMALL.decomposed, SMALL.heads_ranges, strict=True):
        attn = stage.blocks[0].attn
        assert attn.decomposed == decomposed
        H = attn.num_heads
        want = torch.log1p(-(2.0 ** -(2 + rng * torch.arange(H, dtype=torch.float64) / H)))
        torch.testing.assert_close(attn.log_gamma, want)
    assert isinstance(model.stages[0].blocks[0].ls1, torch.nn.Identity)
    assert model.stages[1].blocks[0].ls1.weight.shape == (32,)
    assert model.stages[-1].downsample is None


@pytest.mark.parametrize("size", [(28, 28), (29, 45), (17, 9), (8, 8), (3, 5)])
def test_odd_and_non_square_images(size):
    torch.manual_seed(0)
    model = RMTForImageClassification(SMALL)
    out = model(torch.randn(2, 2, *size), labels=torch.tensor([1, 6]))
    assert out.logits.shape == (2, 7)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_masad_model_equals_masa_model_when_every_w_q_is_zero():
    torch.manual_seed(1)
    masa = RMTForImageClassification(RMTConfig(**{**SMALL.to_dict(), "decomposed": (False,) * 3})).double().eval()
    with torch.no_grad():
        for stage in masa.stages:
            for block in stage.blocks:
                block.attn.q_proj.weight.zero_()
                block.attn.q_proj.bias.zero_()
    masad = RMTForImageClassification(RMTConfig(**{**SMALL.to_dict(), "decomposed": (True,) * 3})).double().eval()
    masad.load_state_dict(masa.state_dict())
    images = torch.randn(2, 2, 23, 30, dtype=torch.float64)
    torch.testing.assert_close(masad(images).logits, masa(images).logits, rtol=1e-10, atol=1e-10)


def test_tiny_presets_run_on_their_images():
    for name, shape in (("rmt-tiny", (2, 1, 28, 28)), ("rmt-tiny-32", (2, 3, 32, 32))):
        model = RMTForImageClassification(RMTConfig.from_preset(name)).eval()
        assert model(torch.randn(shape)).logits.shape == (2, 10)


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="one entry per stage"):
        RMTConfig(dims=(16, 32), depths=(1, 1, 1))
    with pytest.raises(ValueError, match="preset"):
        RMTConfig.from_preset("rmt-xxl")
    with pytest.raises(ValueError, match="pixel_values"):
        RMTForImageClassification(SMALL)(torch.randn(1, 3, 16, 16))


def test_forward_stages_gives_the_four_feature_maps_at_strides_4_to_32():
    """The maps a detection neck reads: (B, C_i, ceil(H / s), ceil(W / s)) for s = 4, 8, 16, 32; the last one is what
    the classification head pools."""
    config = RMTConfig.from_preset("rmt-t", num_layers=(1, 1, 1, 1), num_classes=5)
    model = RMTForImageClassification(config).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = model.forward_stages(images)
        assert [tuple(m.shape) for m in maps] == [
            (2, 64, 16, 24),
            (2, 128, 8, 12),
            (2, 256, 4, 6),
            (2, 512, 2, 3),
        ]
        # the head on the last map: projection, BatchNorm over (B, projection, h * w), swish, mean
        pooled = torch.nn.functional.silu(model.norm(model.proj(maps[-1].permute(0, 2, 3, 1)).flatten(1, 2).mT))
        torch.testing.assert_close(model.head(pooled.mean(-1)), model(images).logits)
