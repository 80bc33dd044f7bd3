"""ViR: the three forms agree, causality in raster order, the class token at the end, official parameter counts."""

import pytest
import torch

from retentive.models import ViRConfig, ViRForImageClassification

SMALL = ViRConfig(
    image_size=12, patch_size=3, in_channels=2, num_classes=5, dim=32, depth=3, num_heads=4, layer_scale=1.0
)
TOKENS = (12 // 3) ** 2 + 1  # 16 patches and the class token


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    ("n_params", "name"),
    [(22_059_496, "vir-small/16"), (86_585_320, "vir-base/16"), (304_374_760, "vir-large/16")],
)
def test_official_parameter_counts(name, n_params):
    model = ViRForImageClassification(ViRConfig.from_preset(name), device="meta")
    assert model.num_parameters() == n_params


@pytest.mark.parametrize("options", [{}, {"rotary": True, "normalize_decay": True}, {"layer_scale": None}])
def test_parallel_recurrent_chunkwise_agree(options):
    torch.manual_seed(0)
    model = ViRForImageClassification(ViRConfig(**{**SMALL.to_dict(), **options})).eval()
    images = torch.randn(3, 2, 12, 12)
    with torch.no_grad():
        want = model.forward_features(images, mode="parallel")
        got = {"recurrent": model.forward_features(images, mode="recurrent")}
        for chunk_size in (1, 3, 5, 8, TOKENS, 64):  # dividing the 17 tokens or not
            got[f"chunk {chunk_size}"] = model.forward_features(images, mode="chunkwise", chunk_size=chunk_size)
        for name, tokens in got.items():
            assert rel_err(tokens, want) < 1e-5, name
        logits = model(images).logits
        for mode in ("recurrent", "chunkwise"):
            assert rel_err(model(images, mode=mode, chunk_size=4).logits, logits) < 1e-5, mode


def test_changing_a_patch_changes_no_output_before_it():
    torch.manual_seed(1)
    model = ViRForImageClassification(SMALL).eval()
    images = torch.randn(2, 2, 12, 12)
    with torch.no_grad():
        base = model.forward_features(images)
        for patch in (0, 5, 6, 15):  # raster order on the 4 x 4 patch grid
            row, col = divmod(patch, 4)
            changed = images.clone()
            changed[:, :, 3 * row : 3 * row + 3, 3 * col : 3 * col + 3] += torch.randn(2, 2, 3, 3)
            out = model.forward_features(changed)
            torch.testing.assert_close(out[:, :patch], base[:, :patch], rtol=0, atol=0)
            assert (out[:, patch:] - base[:, patch:]).abs().amax(-1).min() > 1e-4, "the patch and all after it change"


def test_class_token_is_last_and_sees_every_patch():
    torch.manual_seed(2)
    model = ViRForImageClassification(SMALL).eval()
    images = torch.randn(1, 2, 12, 12)
    with torch.no_grad():
        tokens = model.embed(images)
        torch.testing.assert_close(tokens[:, -1], model.cls_token[:, 0])  # appended after the position embedding
        assert model.pos_embed.shape == (1, TOKENS - 1, 32)
        changed = images.clone()
        changed[:, :, :3, :3] = 0  # the first patch
        assert (model(changed).logits - model(images).logits).abs().max() > 1e-5


def test_loss_and_gradients():
    torch.manual_seed(3)
    model = ViRForImageClassification(SMALL)
    out = model(torch.randn(4, 2, 12, 12), labels=torch.tensor([0, 1, 2, 4]))
    assert out.logits.shape == (4, 5) and out.loss.ndim == 0
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_retention_has_no_gate_no_head_norm_and_linspace_gammas():
    model = ViRForImageClassification(SMALL)
    msr = model.backbone.blocks[0].retention
    assert [p.out_features for p in msr.projections] == [32, 32, 32, 32], "q, k, v, out and no gate"
    assert msr.g_proj is None
    assert msr.head_norm.kind == "none" and msr.value_dim == msr.key_dim and msr.decay == "linspace"


def test_bad_input_is_refused():
    model = ViRForImageClassification(SMALL)
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="mode"):
        model(torch.randn(1, 2, 12, 12), mode="sideways")
    with pytest.raises(ValueError, match="patch_size"):
        ViRConfig(image_size=10, patch_size=3)
    with pytest.raises(ValueError, match="preset"):
        ViRConfig.from_preset("vir-huge")
