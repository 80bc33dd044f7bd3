"""MaSA and MaSAD as functions: against SDPA with the log-decay mask, against their definitions, and each other."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from retentive.ops.decay2d import manhattan_log_decay, rmt_log_gamma
from retentive.ops.masa import decomposed_manhattan_attention, manhattan_attention

shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 7), st.sampled_from([2, 6, 8])
)  # batch, heads, height, width, head dim


def qkv(B, H, N, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3)]


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_masa_equals_sdpa_with_the_additive_log_decay_mask(shape):
    B, H, h, w, D = shape
    q, k, v = qkv(B, H, h * w, D)
    log_g = rmt_log_gamma(H, 2.0, 4.0)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=manhattan_log_decay(log_g, h, w))
    torch.testing.assert_close(manhattan_attention(q, k, v, log_g, h, w), want, rtol=1e-12, atol=1e-12)


def masad_by_definition(q, k, v, log_g, h, w):
    """Rows then columns, one softmax per token, with explicit loops (float64)."""
    B, H, _, D = q.shape
    q, k, v = (t.reshape(B, H, h, w, -1) for t in (q, k, v))
    q = q * D**-0.5
    mid = torch.zeros_like(v)
    for y in range(h):
        for x in range(w):
            logits = (q[:, :, y, x, None, :] * k[:, :, y]).sum(-1)  # (B, H, w)
            logits = logits + log_g[:, None] * (torch.arange(w) - x).abs()
            mid[:, :, y, x] = (logits.softmax(-1)[..., None] * v[:, :, y]).sum(-2)
    out = torch.zeros_like(v)
    for y in range(h):
        for x in range(w):
            logits = (q[:, :, y, x, None, :] * k[:, :, :, x]).sum(-1)  # (B, H, h)
            logits = logits + log_g[:, None] * (torch.arange(h) - y).abs()
            out[:, :, y, x] = (logits.softmax(-1)[..., None] * mid[:, :, :, x]).sum(-2)
    return out.reshape(B, H, h * w, -1)


@settings(max_examples=8, deadline=None)
@given(shapes)
def test_masad_is_rows_then_columns(shape):
    B, H, h, w, D = shape
    q, k, v = qkv(B, H, h * w, D, seed=1)
    log_g = rmt_log_gamma(H, 2.0, 6.0)
    want = masad_by_definition(q, k, v, log_g, h, w)
    torch.testing.assert_close(decomposed_manhattan_attention(q, k, v, log_g, h, w), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid", [(1, 1), (3, 3), (4, 7), (7, 4), (5, 1), (1, 6)])
def test_masa_equals_masad_exactly_when_all_logits_are_equal(grid):
    h, w = grid
    _, k, v = qkv(2, 3, h * w, 8, seed=2)
    q = torch.zeros_like(k)  # W_Q = 0: every logit Q K^T is 0
    log_g = rmt_log_gamma(3, 2.0, 4.0)
    torch.testing.assert_close(
        decomposed_manhattan_attention(q, k, v, log_g, h, w),
        manhattan_attention(q, k, v, log_g, h, w),
        rtol=1e-13,
        atol=1e-13,
    )


def test_masa_differs_from_masad_in_general():
    q, k, v = qkv(2, 3, 5 * 6, 8, seed=3)
    log_g = rmt_log_gamma(3, 2.0, 4.0)
    gap = (decomposed_manhattan_attention(q, k, v, log_g, 5, 6) - manhattan_attention(q, k, v, log_g, 5, 6)).abs()
    assert gap.max() > 1e-2


def test_float32_matches_float64():
    q, k, v = qkv(2, 4, 6 * 5, 16, seed=4)
    log_g = rmt_log_gamma(4)
    for fn in (manhattan_attention, decomposed_manhattan_attention):
        want = fn(q, k, v, log_g, 6, 5)
        got = fn(q.float(), k.float(), v.float(), log_g, 6, 5)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_shape_errors_name_the_grid():
    q, k, v = qkv(1, 2, 12, 4)
    with pytest.raises(ValueError, match="grid"):
        manhattan_attention(q, k, v, rmt_log_gamma(2), 5, 3)
    with pytest.raises(ValueError, match="log_gamma"):
        decomposed_manhattan_attention(q, k, v, rmt_log_gamma(3), 3, 4)
