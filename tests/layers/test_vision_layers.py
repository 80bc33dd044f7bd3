"""RMT's layers: the MaSA layer against an independent composition, MaSA = MaSAD at W_Q = 0, conv pieces, grids."""

import math

import pytest
import torch
import torch.nn.functional as F

from retentive.layers import (
    ConvFeedForward,
    ConvStem,
    DepthwiseConv2d,
    LayerScale,
    ManhattanSelfAttention,
    MaSA,
    MaSAD,
    PatchMerging,
    RMTBlock,
)
from retentive.ops.decay2d import manhattan_log_decay, rmt_log_gamma


def rotate_complex(x, positions):
    """The paper's Theta as complex multiplication: pair i at position n times exp(i n 10000^(-i/(D/2-1)))."""
    D = x.shape[-1]
    angles = 10000.0 ** -torch.linspace(0, 1, D // 2, dtype=torch.float64)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    phase = positions[:, None].double() * angles  # (N, D/2)
    return torch.view_as_real(z * torch.polar(torch.ones_like(phase), phase)).flatten(-2)


def masa_by_hand(layer, x):
    """Projections, rotary on the raster index, SDPA with the Manhattan mask, LCE on V, output projection."""
    B, h, w, C = x.shape
    H, D = layer.num_heads, C // layer.num_heads
    raster = torch.arange(h * w)
    q, k = (rotate_complex(p(x).reshape(B, h * w, H, D).transpose(1, 2), raster) for p in (layer.q_proj, layer.k_proj))
    v = layer.v_proj(x).double()
    mask = manhattan_log_decay(rmt_log_gamma(H, 2.0, 4.0), h, w)
    o = F.scaled_dot_product_attention(q, k, v.reshape(B, h * w, H, D).transpose(1, 2), attn_mask=mask)
    conv = layer.lce.conv
    lce = F.conv2d(v.permute(0, 3, 1, 2), conv.weight.double(), conv.bias.double(), padding=2, groups=C)
    o = o.transpose(1, 2).reshape(B, h, w, C) + lce.permute(0, 2, 3, 1)
    return F.linear(o, layer.out_proj.weight.double(), layer.out_proj.bias.double())


@pytest.mark.parametrize("grid", [(1, 1), (4, 4), (3, 5), (7, 2)])
def test_masa_layer_equals_sdpa_composition(grid):
    torch.manual_seed(0)
    layer = MaSA(16, 2, initial_value=2.0, heads_range=4.0).double()
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), masa_by_hand(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grid", [(5, 5), (3, 8), (6, 1)])
def test_masa_layer_equals_masad_layer_when_w_q_is_zero(grid):
    torch.manual_seed(1)
    masa, masad = MaSA(24, 3).double(), MaSAD(24, 3).double()
    with torch.no_grad():
        masa.q_proj.weight.zero_()
        masa.q_proj.bias.zero_()
    masad.load_state_dict(masa.state_dict())
    x = torch.randn(2, *grid, 24, dtype=torch.float64)
    torch.testing.assert_close(masad(x), masa(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        masa.q_proj.weight.normal_()
    masad.load_state_dict(masa.state_dict())
    gap = (masad(x) - masa(x)).abs().max()
    if min(grid) > 1:
        assert gap > 1e-3, "with W_Q != 0 the two must differ"
    else:  # on a single row or column both are the same 1-D attention
        assert gap < 1e-12


def test_heads_get_the_stage_gammas():
    layer = ManhattanSelfAttention(64, 8, initial_value=2.0, heads_range=6.0)
    want = [math.log(1 - 2 ** -(2 + 6 * h / 8)) for h in range(8)]
    torch.testing.assert_close(layer.log_gamma, torch.tensor(want, dtype=torch.float64))
    assert not layer.decomposed and ManhattanSelfAttention(64, 8, decomposed=True).decomposed


@pytest.mark.parametrize("decomposed", [False, True])
def test_rmt_block_keeps_odd_and_non_square_grids(decomposed):
    torch.manual_seed(2)
    block = RMTBlock(32, 4, 64, decomposed=decomposed, layer_scale=0.5)
    x = torch.randn(3, 5, 9, 32, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_rmt_block_is_residual_cpe_then_attention_then_ffn():
    torch.manual_seed(3)
    block = RMTBlock(16, 2, 32, layer_scale=0.25).double()
    x = torch.randn(1, 3, 4, 16, dtype=torch.float64)
    x1 = x + block.cpe(x)
    x2 = x1 + 0.25 * block.attn(block.norm1(x1))
    torch.testing.assert_close(block(x), x2 + 0.25 * block.ffn(block.norm2(x2)))


def test_conv_pieces_shapes_and_parameter_counts():
    dw = DepthwiseConv2d(12, 5)
    assert sum(p.numel() for p in dw.parameters()) == 12 * 25 + 12
    x = torch.randn(2, 7, 5, 12)
    assert dw(x).shape == x.shape
    ffn = ConvFeedForward(12, 36)
    assert ffn(x).shape == x.shape
    assert sum(p.numel() for p in ffn.parameters()) == (12 * 36 + 36) + (36 * 9 + 36) + (36 * 12 + 12)
    assert ConvStem(3, 32)(torch.randn(2, 3, 29, 18)).shape == (2, 8, 5, 32)  # ceil(/4)
    assert PatchMerging(12, 24)(x).shape == (2, 4, 3, 24)  # ceil(/2)


def test_depthwise_conv_is_per_channel():
    dw = DepthwiseConv2d(4, 3)
    x = torch.zeros(1, 5, 5, 4)
    x[0, 2, 2, 1] = 1.0  # an impulse in channel 1 only
    y = dw(x) - dw.conv.bias
    assert y[..., [0, 2, 3]].abs().max() == 0
    torch.testing.assert_close(y[0, 1:4, 1:4, 1], dw.conv.weight[1, 0].flip(0, 1))


def test_layer_scale_starts_at_its_init_value():
    ls = LayerScale(6, 1e-5)
    torch.testing.assert_close(ls(torch.ones(2, 6)), torch.full((2, 6), 1e-5))


def test_bad_widths_are_refused():
    with pytest.raises(ValueError, match="num_heads"):
        MaSA(30, 4)
    with pytest.raises(ValueError, match="even head dim"):
        MaSAD(12, 4)  # head dim 3
    with pytest.raises(ValueError, match="kernel_size"):
        DepthwiseConv2d(8, 4)
