"""timm.create_model builds retentive's RMT and ViR, with timm's interface and features_only maps. It runs where timm
imports (the GPU check, benchmarks/gpucheck/stack.py); on machines where it does not (not installed, or the PyPI
torchvision wheel, a CUDA build, failing against a CPU torch: "operator torchvision::nms does not exist") it skips
with that reason. The same methods are tested without timm in test_vision_hub.py."""

import pytest
import torch

try:
    import timm
    import timm.data
except Exception as e:  # an ImportError, or torchvision's RuntimeError at import
    pytest.skip(f"timm does not import here: {type(e).__name__}: {e}"[:400], allow_module_level=True)

from retentive.models import RMT_PRESETS, VIR_PRESETS, RMTForImageClassification, ViRForImageClassification
from retentive.models.timm_models import timm_name


def test_every_preset_is_registered() -> None:
    want = {timm_name(preset) for preset in (*RMT_PRESETS, *VIR_PRESETS)}
    assert {"rmt_t", "rmt_s", "rmt_b", "rmt_l", "vir_small_patch16"} <= want
    assert want <= set(timm.list_models("rmt_*") + timm.list_models("vir_*"))


@pytest.mark.parametrize(
    ("name", "cls"), [("rmt_t", RMTForImageClassification), ("vir_tiny_32", ViRForImageClassification)]
)
def test_create_model_builds_our_model_with_timm_interface(name: str, cls: type) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    assert type(model) is cls and model.num_classes == model.config.num_classes == 10
    side = model.config.image_size
    images = torch.randn(2, 3, side, side)
    with torch.no_grad():
        features = model.forward_features(images)
        torch.testing.assert_close(model.forward_head(features), model(images).logits)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, side, side) and data["interpolation"] == "bicubic"
    assert data["crop_pct"] == 0.875 and tuple(data["mean"]) == (0.485, 0.456, 0.406)
    model.reset_classifier(4)
    assert model.get_classifier().out_features == 4 and model(images).logits.shape == (2, 4)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model(name, pretrained=True)


def test_features_only_rmt_gives_the_four_stages() -> None:
    net = timm.create_model("rmt_t", features_only=True, num_layers=(1, 1, 1, 1)).eval()
    assert net.feature_info.channels() == [64, 128, 256, 512]
    assert net.feature_info.reduction() == [4, 8, 16, 32]
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = net(images)
        assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
        for got, want in zip(net.model.forward_stages(images), maps, strict=True):
            torch.testing.assert_close(got, want)
    picked = timm.create_model("rmt_t", features_only=True, out_indices=(1, 3), num_layers=(1, 1, 1, 1))
    assert picked.feature_info.channels() == [128, 512]


def test_features_only_vir_gives_block_outputs_at_stride_16() -> None:
    net = timm.create_model("vir_small_patch16", features_only=True, num_layers=2, out_indices=(0, 1)).eval()
    assert net.feature_info.channels() == [384, 384] and net.feature_info.reduction() == [16, 16]
    with torch.no_grad():
        maps = net(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(1, 384, 14, 14)] * 2


@torch.no_grad()
def test_timms_own_feature_getter_takes_our_models() -> None:
    """timm's FeatureGetterNet (what features_only builds for models with forward_intermediates) prunes our models
    through prune_intermediate_layers and reads them through forward_intermediates; features_only prunes them too."""
    from timm.models._features import FeatureGetterNet

    def create(name: str, **fields: object) -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, **fields).eval()

    images = torch.randn(1, 3, 64, 96)
    want = create("rmt_t", num_layers=(1, 1, 1, 1)).forward_stages(images)
    getter = FeatureGetterNet(create("rmt_t", num_layers=(1, 1, 1, 1)), out_indices=(0, -3))
    assert getter.feature_info.channels() == [64, 128] and len(getter.model.stages) == 2
    for got, expected in zip(getter(images), want[:2], strict=True):
        torch.testing.assert_close(got, expected)
    net = timm.create_model("rmt_t", features_only=True, out_indices=(1,), num_layers=(1, 1, 1, 1))
    assert len(net.model.stages) == 2 and net.model.num_classes == 0
    images = torch.randn(1, 3, 224, 224)
    want = create("vir_small_patch16", num_layers=3).forward_intermediates(images, output_fmt="NLC")[1]
    getter = FeatureGetterNet(create("vir_small_patch16", num_layers=3), out_indices=2, output_fmt="NLC")
    assert getter.feature_info.channels() == [384, 384] and getter.model.backbone.num_layers == 3
    for got, expected in zip(getter(images), want[1:], strict=True):
        assert got.shape == (1, 196, 384)
        torch.testing.assert_close(got, expected)
