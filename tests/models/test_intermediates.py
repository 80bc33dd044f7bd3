"""timm's feature extraction without timm: forward_intermediates and prune_intermediate_layers on ViR and RMT, and
the backbone's ``depth`` under them. Each map is checked against the model recomputed by hand (block by block,
stage by stage); timm's own features_only models over them: test_timm.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from retentive.models import RetNet, RMTConfig, RMTForImageClassification, ViRConfig, ViRForImageClassification
from retentive.models.image_classifier import take_indices

FORMS = ({"mode": "parallel"}, {"mode": "chunkwise", "chunk_size": 4}, {"mode": "recurrent"})


@pytest.fixture(autouse=True)
def no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def vir() -> ViRForImageClassification:
    torch.manual_seed(0)
    config = ViRConfig(image_size=48, patch_size=16, dim_model=32, num_layers=3, num_heads=4, num_classes=5)
    return ViRForImageClassification(config).eval()


def rmt() -> RMTForImageClassification:
    torch.manual_seed(0)
    return RMTForImageClassification(RMTConfig.from_preset("rmt-t", num_layers=(1, 1, 1, 1), num_classes=5)).eval()


def vir_blocks(model: ViRForImageClassification, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output (B, num_patches + 1, d), block by block from the embedded tokens."""
    x, outputs = model.embed(images), []
    for block in model.backbone.blocks:
        x = block(x, mode="parallel")
        outputs.append(x)
    return outputs


def as_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, num_patches + 1, d), the class token last -> the patches as a map (B, d, side, side)."""
    return tokens[:, :-1].mT.reshape(tokens.shape[0], -1, side, side)


def test_take_indices_follows_timm() -> None:
    assert take_indices(4, None) == [0, 1, 2, 3]
    assert take_indices(4, 2) == [2, 3]  # an int: the last n
    assert take_indices(4, (0, -1)) == [0, 3]  # negative from the end, in the order asked
    for bad in (0, 5, (4,), (-5,), (), (1.0,)):
        with pytest.raises(ValueError, match="indices"):
            take_indices(4, bad)


@pytest.mark.parametrize("form", FORMS, ids=[f["mode"] for f in FORMS])
def test_vir_intermediates_are_the_blocks_outputs_in_every_form(form: dict) -> None:
    model, images = vir(), torch.randn(2, 3, 48, 48)
    blocks = vir_blocks(model, images)
    features, maps = model.forward_intermediates(images, **form)
    torch.testing.assert_close(features, model.forward_features(images), rtol=1e-5, atol=1e-5)
    assert len(maps) == 3 and all(m.shape == (2, 32, 3, 3) for m in maps)
    for got, want in zip(maps, blocks, strict=True):
        torch.testing.assert_close(got, as_map(want, 3), rtol=1e-5, atol=1e-5)
    normed = model.forward_intermediates(images, [-1, 0], norm=True, output_fmt="NLC", intermediates_only=True, **form)
    for got, want in zip(normed, (blocks[2], blocks[0]), strict=True):
        torch.testing.assert_close(got, model.backbone.norm(want)[:, :-1], rtol=1e-5, atol=1e-5)


def test_vir_stops_early_after_the_last_block_taken() -> None:
    model, images = vir(), torch.randn(2, 3, 48, 48)
    blocks = vir_blocks(model, images)
    ran = []
    model.backbone.blocks[2].register_forward_hook(lambda *_: ran.append(True))
    features, maps = model.forward_intermediates(images, (0, 1), stop_early=True)
    assert not ran
    torch.testing.assert_close(features, model.backbone.norm(blocks[1]))
    for got, want in zip(maps, blocks[:2], strict=True):
        torch.testing.assert_close(got, as_map(want, 3))
    model.forward_intermediates(images, 1, stop_early=True)
    assert ran


def test_rmt_intermediates_are_the_stages_before_their_merging() -> None:
    model, images = rmt(), torch.randn(2, 3, 64, 96)
    x, want = model.stem(images), []
    for stage in model.stages:
        x = stage.forward_blocks(x)
        want.append(x.permute(0, 3, 1, 2))
        x = x if stage.downsample is None else stage.downsample(x)
    features, maps = model.forward_intermediates(images)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [(64, 4), (128, 8), (256, 16), (512, 32)]
    for got, expected in zip(maps, want, strict=True):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(features, model.forward_features(images))
    for got, expected in zip(model.forward_intermediates(images, (3, 1), norm=True, intermediates_only=True),
                             (want[3], want[1]), strict=True):  # fmt: skip
        torch.testing.assert_close(got, expected)  # norm: RMT ends in none
    ran = []
    model.stages[2].blocks[0].register_forward_hook(lambda *_: ran.append(True))
    features, maps = model.forward_intermediates(images, (0, 1), stop_early=True)
    assert not ran and len(maps) == 2
    torch.testing.assert_close(features, want[1])  # the last stage run, before its merging
    model.forward_intermediates(images, (0, 1))
    assert ran
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(images, output_fmt="NLC")


def test_pruned_vir_gives_the_same_maps_without_the_rest() -> None:
    model, images = vir(), torch.randn(2, 3, 48, 48)
    want = model.forward_intermediates(images, (0, 1), intermediates_only=True)
    assert model.prune_intermediate_layers((0, -2), prune_norm=True) == [0, 1]
    assert model.backbone.num_layers == 2 and len(model.feature_info) == 2
    assert isinstance(model.backbone.norm, torch.nn.Identity) and model.num_classes == 0
    for got, expected in zip(model.forward_intermediates(images, (0, 1), intermediates_only=True), want, strict=True):
        torch.testing.assert_close(got, expected)
    assert model.cls_token is None and model.embed(images).shape == (2, 9, 32)  # the class token went with the head
    with pytest.raises(RuntimeError, match="pruned"):
        model(images)
    whole = vir()
    whole.prune_intermediate_layers(None, prune_head=False)
    torch.testing.assert_close(whole(images).logits, vir()(images).logits)


def test_pruned_rmt_keeps_the_stages_asked_and_says_its_head_is_gone() -> None:
    model, images = rmt(), torch.randn(2, 3, 64, 96)
    want = model.forward_stages(images)
    count = model.num_parameters()
    assert model.prune_intermediate_layers((0, 1)) == [0, 1]
    assert len(model.stages) == 2 and model.stages[-1].downsample is None and model.num_features == 128
    assert [i["num_chs"] for i in model.feature_info] == [64, 128] and model.num_parameters() < count / 4
    features, maps = model.forward_intermediates(images)
    for got, expected in zip(maps, want[:2], strict=True):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(features, want[1])
    with pytest.raises(RuntimeError, match="pruned"):
        model(images)
    whole = rmt()
    assert whole.prune_intermediate_layers(None, prune_head=False) == [0, 1, 2, 3] and whole.num_classes == 5
    assert whole.prune_intermediate_layers(None) == [0, 1, 2, 3] and whole.num_classes == 0
    assert whole.num_parameters() == sum(p.numel() for p in (*whole.stem.parameters(), *whole.stages.parameters()))
    with pytest.raises(RuntimeError, match="pruned"):
        whole(images)


def test_backbone_depth_runs_the_first_blocks_without_the_final_norm() -> None:
    torch.manual_seed(0)
    net = RetNet(num_layer=3, num_heads=2, dim_model=16, value_factor=2).eval()
    x = torch.randn(2, 10, 16)
    want = net.blocks[1](net.blocks[0](x, mode="parallel"), mode="parallel")
    hidden: list[torch.Tensor] = []
    torch.testing.assert_close(net(x, depth=2, hidden_states=hidden), want)
    assert len(hidden) == 2
    y, state = net(x[:, :6], mode="chunkwise", chunk_size=4, depth=2, return_state=True)
    assert len(state) == 2
    rest = net(x[:, 6:], mode="chunkwise", chunk_size=4, depth=2, state=state)
    torch.testing.assert_close(torch.cat([y, rest], 1), want, rtol=1e-5, atol=1e-5)
    for bad in (0, 4, 1.5):
        with pytest.raises(ValueError, match="depth"):
            net(x, depth=bad)
    with pytest.raises(ValueError, match="state"):
        net(x[:, :1], mode="recurrent", state=state)  # two states for three blocks
