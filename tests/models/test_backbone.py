"""RMT and ViR as transformers' backbones: AutoBackbone from a config or a saved classifier's folder, and the
backbone of UperNet (semantic segmentation, as RMT's paper evaluates it on ADE20K). The maps are checked against
the classifier recomputed by hand, stage by stage or block by block."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from freshproc import run_fresh
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from retentive.models import (
    RMTBackbone,
    RMTConfig,
    RMTForImageClassification,
    ViRBackbone,
    ViRConfig,
    ViRForImageClassification,
)

STAGES = ["stage1", "stage2", "stage3", "stage4"]


@pytest.fixture(autouse=True)
def no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def rmt_config(**fields: object) -> RMTConfig:
    return RMTConfig.from_preset("rmt-t", num_layers=(1, 1, 1, 1), num_classes=5, **fields)


def vir_config(**fields: object) -> ViRConfig:
    return ViRConfig(image_size=48, patch_size=16, dim_model=32, num_layers=3, num_heads=4, num_classes=5, **fields)


def rmt_maps(model: RMTForImageClassification, images: torch.Tensor) -> list[torch.Tensor]:
    """The stem's map, then each stage's before its merging, stage by stage."""
    x = model.stem(images)
    maps = [x.permute(0, 3, 1, 2)]
    for stage in model.stages:
        x = stage.forward_blocks(x)
        maps.append(x.permute(0, 3, 1, 2))
        x = x if stage.downsample is None else stage.downsample(x)
    return maps


def vir_maps(model: ViRForImageClassification, images: torch.Tensor) -> list[torch.Tensor]:
    """The embedded tokens, then each block's output, block by block, normalized, the patches as (B, d, 3, 3)."""
    x = model.embed(images)
    hidden = [x]
    for block in model.backbone.blocks:
        x = block(x, mode="parallel")
        hidden.append(x)
    return [model.backbone.norm(h)[:, :-1].mT.reshape(len(images), 32, 3, 3) for h in hidden]


def test_rmt_backbone_gives_the_stem_and_the_stages_it_is_asked_for() -> None:
    torch.manual_seed(0)
    whole = RMTForImageClassification(rmt_config()).eval()
    torch.manual_seed(0)
    backbone = AutoBackbone.from_config(rmt_config(out_features=["stem", *STAGES])).eval()
    assert type(backbone) is RMTBackbone
    assert backbone.stage_names == ["stem", *STAGES] and backbone.channels == [64, 64, 128, 256, 512]
    images = torch.randn(2, 3, 64, 96)
    want = rmt_maps(whole, images)
    out = backbone(images)
    assert out.hidden_states is None and len(out.feature_maps) == 5
    for got, expected in zip(out.feature_maps, want, strict=True):
        torch.testing.assert_close(got, expected)
    backbone.out_indices = [1, -2]  # as transformers takes them; the stages past stage3 are not run
    ran = []
    backbone.classifier.stages[3].blocks[0].register_forward_hook(lambda *_: ran.append(True))
    maps, hidden = backbone(images, output_hidden_states=False, return_dict=False), None
    assert not ran and len(maps) == 1 and len(maps[0]) == 2
    torch.testing.assert_close(maps[0][1], want[3])
    maps, hidden = backbone(images, output_hidden_states=True, return_dict=False)
    assert ran and len(hidden) == 5
    for got, expected in zip(hidden, want, strict=True):
        torch.testing.assert_close(got, expected)


def test_vir_backbone_gives_normalized_block_outputs_as_maps() -> None:
    torch.manual_seed(0)
    whole = ViRForImageClassification(vir_config()).eval()
    torch.manual_seed(0)
    backbone = AutoBackbone.from_config(vir_config(out_indices=[0, 2, 3])).eval()
    assert type(backbone) is ViRBackbone and backbone.out_features == ["stem", "stage2", "stage3"]
    images = torch.randn(2, 3, 48, 48)
    want = vir_maps(whole, images)
    for got, expected in zip(backbone(images).feature_maps, (want[0], want[2], want[3]), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_backbone_refuses_what_it_cannot_give() -> None:
    backbone = RMTBackbone(rmt_config()).eval()
    assert backbone.out_features == ["stage4"]  # transformers' default: the last stage
    with pytest.raises(ValueError, match="attention"):
        backbone(torch.randn(1, 3, 32, 32), output_attentions=True)
    backbone.forward_with_filtered_kwargs(torch.randn(1, 3, 32, 32), output_attentions=False)
    with pytest.raises(ValueError, match="stage_names"):
        rmt_config(out_features=["stage5"])
    assert not any(name.startswith(("classifier.head", "classifier.proj")) for name, _ in backbone.named_parameters())


@pytest.mark.parametrize("name", ["rmt", "vir"])
def test_a_saved_classifier_loads_as_a_backbone_here_and_in_a_fresh_process(name: str, tmp_path: Path) -> None:
    """A classifier's folder loads as its backbone (its weights, the maps asked for), in this process and through
    the folder's auto_map in one that never imported retentive (the class AutoBackbone's trust_remote_code route
    takes; AutoBackbone.from_pretrained itself takes only Hub ids in transformers 5.25, whatever the model)."""
    torch.manual_seed(0)
    cls, config, side = {
        "rmt": (RMTForImageClassification, rmt_config(), 64),
        "vir": (ViRForImageClassification, vir_config(), 48),
    }[name]
    classifier = cls(config).eval()
    classifier.save_pretrained(tmp_path / "saved")
    images = torch.randn(1, 3, side, side)
    want = (rmt_maps if name == "rmt" else vir_maps)(classifier, images)
    backbone_class = {"rmt": RMTBackbone, "vir": ViRBackbone}[name]
    backbone = backbone_class.from_pretrained(tmp_path / "saved", out_indices=[1, 3])
    assert backbone.config.num_classes == 5  # the config keeps the classifier's classes
    for got, expected in zip(backbone(images).feature_maps, (want[1], want[3]), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.save(images, tmp_path / "images.pt")
    result = run_fresh(
        f"""
        import json, sys, torch
        from transformers import AutoConfig
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        assert "retentive" not in sys.modules
        folder = {str(tmp_path / "saved")!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        backbone = get_class_from_dynamic_module(config.auto_map["AutoBackbone"], folder).from_pretrained(
            folder, out_indices=[3]
        )
        with torch.no_grad():
            (last,) = backbone(torch.load({str(tmp_path / "images.pt")!r})).feature_maps
        print("RESULT", json.dumps({{"type": type(backbone).__name__, "map": last.tolist()}}))
        """,
        tmp_path,
    )
    assert result["type"] == backbone_class.__name__
    torch.testing.assert_close(torch.tensor(result["map"]), want[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rmt", "vir"])
def test_upernet_segments_on_our_backbone_trains_every_parameter_and_reloads(name: str, tmp_path: Path) -> None:
    """UperNet's four-level head on RMT's four stages (or ViR's blocks at one stride): a loss whose backward reaches
    every parameter (so DDP needs no find_unused_parameters), and save_pretrained / from_pretrained give the same
    logits."""
    backbone_config, side = (
        (rmt_config(out_features=STAGES), 64) if name == "rmt" else (vir_config(out_indices=[1, 2, 3]), 48)
    )
    torch.manual_seed(0)
    config = UperNetConfig(backbone_config=backbone_config, num_labels=4, hidden_size=32, auxiliary_channels=16)
    model = UperNetForSemanticSegmentation(config)
    images, labels = torch.randn(2, 3, side, side), torch.randint(0, 4, (2, side, side))
    with torch.enable_grad():
        out = model(images, labels=labels)
        out.loss.backward()
    assert out.logits.shape == (2, 4, side, side) and out.loss.isfinite()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    model.eval().save_pretrained(tmp_path / "upernet")
    again = UperNetForSemanticSegmentation.from_pretrained(str(tmp_path / "upernet")).eval()
    assert type(again.backbone).__name__ == type(model.backbone).__name__
    torch.testing.assert_close(again(images).logits, model(images).logits)


def test_detr_detects_on_rmts_last_stage() -> None:
    """DETR (transformers' load_backbone, its batch norms frozen) on RMT's last stage: boxes, a loss, and a backward
    pass that reaches every parameter that trains."""
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    config = DetrConfig(
        backbone_config=rmt_config(out_indices=[4]), use_timm_backbone=False, use_pretrained_backbone=False,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
        num_labels=3,
    )  # fmt: skip
    model = DetrForObjectDetection(config)
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    with torch.enable_grad():
        out = model(torch.randn(2, 3, 64, 64), labels=labels)
        out.loss.backward()
    assert out.logits.shape == (2, 10, 4) and out.pred_boxes.shape == (2, 10, 4) and out.loss.isfinite()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
