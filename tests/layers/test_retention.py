"""MultiScaleRetention: its forms agree, it streams with rotary at absolute positions, it is causal,
it handles left padding, and it accepts the seed repository's arguments (SPEC §5, §7)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retentive.layers import GATES, HEAD_NORMS, MultiScaleRetention
from retentive.ops import RetentionState, log_gamma

F64 = torch.float64
NORMS = list(itertools.product([False, True], repeat=2))  # (normalize_attn, normalize_retn)
FORMS = [
    {"mode": "parallel"},
    {"mode": "chunkwise", "chunk_size": 1},
    {"mode": "chunkwise", "chunk_size": 6},
    {"mode": "recurrent"},
]
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def msr(dim_model: int = 16, num_heads: int = 4, seed: int = 0, **kwargs) -> MultiScaleRetention:
    """A float64 layer with random (not default) head-norm affine and biases, so nothing hides behind 1s and 0s."""
    torch.manual_seed(seed)
    layer = MultiScaleRetention(dim_model, num_heads, dtype=F64, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:  # biases and the head norm's affine
                p.normal_()
    return layer


def x_(B: int, T: int, d: int = 16, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(B, T, d, dtype=F64)


@pytest.mark.parametrize("normalize_attn,normalize_retn", NORMS)
@pytest.mark.parametrize("attn_mask", ["causal", None])
def test_forms_agree_forward_and_parameter_gradients(attn_mask, normalize_attn, normalize_retn):
    layer, x = msr(), x_(2, 23)
    kw = {"attn_mask": attn_mask, "normalize_attn": normalize_attn, "normalize_retn": normalize_retn}
    outs, grads = [], []
    for form in FORMS:
        y = layer(x, **kw, **form)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), list(layer.parameters())))
    for y, g in zip(outs[1:], grads[1:], strict=True):
        torch.testing.assert_close(y, outs[0], **TIGHT)
        for a, b in zip(g, grads[0], strict=True):
            torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("head_norm", HEAD_NORMS)
@pytest.mark.parametrize("gate_fn", list(GATES))
def test_every_gate_and_head_norm_keeps_the_forms_equal(gate_fn, head_norm):
    layer, x = msr(gate_fn=gate_fn, head_norm=head_norm, bias=True, decay="linspace"), x_(1, 13)
    want = layer(x, normalize_attn=True, normalize_retn=True)
    for form in FORMS[1:]:
        torch.testing.assert_close(layer(x, normalize_attn=True, normalize_retn=True, **form), want, **TIGHT)


@pytest.mark.parametrize("head_norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("gate_fn", ["swish", "none"])
def test_head_norm_weight_by_its_formula_and_in_every_form_with_gradients(head_norm, gate_fn):
    """flash-linear-attention's head norm: RMSNorm per head times a learnable per-channel weight, then the gate."""
    layer = msr(head_norm=head_norm, head_norm_weight=True, head_norm_eps=1e-5, gate_fn=gate_fn, value_dim=24)
    assert layer.head_norm.weight.shape == (24,) and layer.head_norm.bias is None
    x = x_(2, 13)
    outs = []
    for form in FORMS:
        y = layer(x, **form)
        outs.append((y, torch.autograd.grad(y.square().sum(), list(layer.parameters()))))
    for y, g in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], **TIGHT)
        for a, b in zip(g, outs[0][1], strict=True):
            torch.testing.assert_close(a, b, **TIGHT)
    o = torch.randn(2, 4, 13, 6, dtype=F64)  # (B, H, T, Dv)
    h = o.transpose(1, 2)
    if head_norm == "layernorm":
        h = h - h.mean(-1, keepdim=True)
    h = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-5)).flatten(-2) * layer.head_norm.weight
    torch.testing.assert_close(layer.head_norm.gated(o, None, "none"), h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize_attn,normalize_retn", NORMS)
def test_seed_api_num_chunks_agree_with_parallel(normalize_attn, normalize_retn):
    """MultiScaleRetention(dim_model, num_heads, gate_fn, value_factor); forward(x, attn_mask, num_chunks, ...)."""
    torch.manual_seed(0)
    layer = MultiScaleRetention(32, 4, "gelu", 2).double()
    x = x_(2, 30, 32)  # 30 tokens: 8 chunks of 4, the last one of 2
    want = layer(x, "causal", None, normalize_attn, normalize_retn)
    for num_chunks in (1, 8, 30):
        got = layer(
            x, attn_mask="causal", num_chunks=num_chunks, normalize_attn=normalize_attn, normalize_retn=normalize_retn
        )
        torch.testing.assert_close(got, want, **TIGHT)
    assert layer.value_dim == 16 and layer.out_proj.in_features == 64  # value_factor 2: dv = 2 d / H


def test_attn_mask_none_is_bidirectional():
    layer, x = msr(), x_(1, 10)
    y = layer(x, attn_mask=None)
    x2 = x.clone()
    x2[:, -1] += 1
    assert (layer(x2, attn_mask=None)[:, 0] - y[:, 0]).abs().max() > 1e-6  # the first token sees the last
    for num_chunks in (1, 3, 10):
        torch.testing.assert_close(layer(x, attn_mask=None, num_chunks=num_chunks), y, **TIGHT)


@pytest.mark.parametrize("normalize", [False, True])
def test_causality(normalize):
    """Changing token j changes no output before j (with every normalization on or off)."""
    layer, x = msr(), x_(2, 17)
    for form in FORMS:
        y = layer(x, normalize_attn=normalize, normalize_retn=normalize, **form)
        for j in (0, 9, 16):
            x2 = x.clone()
            x2[:, j] += 3 * torch.randn_like(x2[:, j])
            y2 = layer(x2, normalize_attn=normalize, normalize_retn=normalize, **form)
            torch.testing.assert_close(y2[:, :j], y[:, :j], rtol=0, atol=1e-12)
            assert (y2[:, j] - y[:, j]).abs().max() > 1e-6


@settings(max_examples=10, deadline=None)
@given(
    T=st.integers(2, 120),
    cuts=st.lists(st.floats(0, 1), min_size=1, max_size=5),
    forms=st.lists(st.sampled_from(FORMS), min_size=6),
    norms=st.sampled_from(NORMS),
)
def test_streaming_in_random_pieces_equals_whole(T, cuts, forms, norms):
    """Pieces of random sizes, each in a random form, carrying the state (and the rotary offset)."""
    layer, x = msr(), x_(2, T)
    kw = {"normalize_attn": norms[0], "normalize_retn": norms[1]}
    want, want_state = layer(x, return_state=True, **kw)
    bounds = sorted({0, T, *(int(c * T) for c in cuts)})
    outs, state = [], None
    for (a, b), form in zip(itertools.pairwise(bounds), forms, strict=False):
        y, state = layer(x[:, a:b], state=state, return_state=True, **form, **kw)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=1), want, **TIGHT)
    torch.testing.assert_close(state.S, want_state.S, **TIGHT)
    torch.testing.assert_close(state.z, want_state.z, **TIGHT)
    assert state.offset.tolist() == [T, T]


def test_chunkwise_prefill_then_recurrent_decode():
    layer, x = msr(), x_(2, 40)
    want = layer(x, normalize_attn=True, normalize_retn=True)
    y, state = layer(
        x[:, :29], mode="chunkwise", chunk_size=8, return_state=True, normalize_attn=True, normalize_retn=True
    )
    outs = [y]
    for t in range(29, 40):
        y, state = layer(
            x[:, t : t + 1], mode="recurrent", state=state, return_state=True, normalize_attn=True, normalize_retn=True
        )
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=1), want, **TIGHT)


def test_rotary_uses_absolute_positions():
    """Without the state's offset the continuation would restart the rotation at 0 and differ."""
    layer, x = msr(), x_(1, 12)
    _, state = layer(x[:, :8], return_state=True)
    fresh = RetentionState(state.S, state.z, torch.zeros_like(state.offset))
    assert (layer(x[:, 8:], state=fresh) - layer(x, return_state=False)[:, 8:]).abs().max() > 1e-6


@pytest.mark.parametrize("form", FORMS)
def test_left_padding_gives_the_unpadded_result_and_state(form):
    """A row padded on the left by 5 tokens of noise equals the row alone on its real tokens, and continues alike."""
    layer = msr()
    real, other = x_(1, 14, seed=2), x_(1, 19, seed=3)
    x = torch.cat([torch.cat([100 * torch.randn(1, 5, 16, dtype=F64), real], dim=1), other])  # (2, 19, 16)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[0, :5] = False
    kw = {"normalize_attn": True, "normalize_retn": True, **form}
    y, state = layer(x, padding_mask=mask, return_state=True, **kw)
    y_real, state_real = layer(real, return_state=True, **kw)
    y_other, state_other = layer(other, return_state=True, **kw)
    torch.testing.assert_close(y[:1, 5:], y_real, **TIGHT)
    torch.testing.assert_close(y[1:], y_other, **TIGHT)
    assert state.offset.tolist() == [14, 19]

    step = x_(2, 3, seed=4)
    y_next, _ = layer(step, state=state, return_state=True, **kw)
    torch.testing.assert_close(y_next[:1], layer(step[:1], state=state_real, **kw), **TIGHT)
    torch.testing.assert_close(y_next[1:], layer(step[1:], state=state_other, **kw), **TIGHT)


@pytest.mark.parametrize("decay", ["retnet", [1 - 2.0**-h for h in range(5, 13)]])
def test_bfloat16_module_keeps_its_gammas(decay):
    """.to(bfloat16) must not round gamma = 1 - 2^-12 to 1: the gammas live outside parameters and buffers."""
    layer = MultiScaleRetention(64, 8, "swish", 2, decay=decay)
    gamma = log_gamma(layer.decay, 8).exp()
    half = layer.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    torch.testing.assert_close(log_gamma(half.decay, 8).exp(), gamma, rtol=0, atol=0)
    assert gamma.dtype == F64 and (gamma < 1).all() and gamma.max() == 1 - 2**-12


def test_bfloat16_module_stays_close_to_float64():
    half = MultiScaleRetention(64, 8, "swish", 2).to(torch.bfloat16)
    wide = MultiScaleRetention(64, 8, "swish", 2).double()
    wide.load_state_dict({k: v.double() for k, v in half.state_dict().items()})  # the same (bf16-rounded) weights
    torch.manual_seed(5)
    x = torch.randn(1, 300, 64).to(torch.bfloat16)
    far = RetentionState.zeros(1, 8, 8, 16, offset=4000)  # positions past 4,000: bf16 (8 bits) cannot tell them apart
    for kw in ({}, {"mode": "recurrent"}, {"mode": "chunkwise", "chunk_size": 1}, {"state": far}):
        y = half(x, **kw)
        want = wide(x.double(), **kw)
        assert y.dtype == torch.bfloat16 and y.isfinite().all()
        assert ((y.double() - want).abs().max() / want.abs().max()).item() < 2e-2


def test_parameters_follow_dtype_and_device_arguments():
    layer = MultiScaleRetention(16, 2, dtype=F64, device="cpu")
    assert {p.dtype for p in layer.parameters()} == {F64}


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"dim_model \(30\) must be a positive multiple of num_heads \(4\)"):
        MultiScaleRetention(30, 4)
    with pytest.raises(ValueError, match="gate_fn must be one of"):
        MultiScaleRetention(16, 2, "tanh")
    with pytest.raises(ValueError, match="head_norm must be one of"):
        MultiScaleRetention(16, 2, head_norm="batchnorm")
    with pytest.raises(ValueError, match="value_factor must be an integer >= 1"):
        MultiScaleRetention(16, 2, value_factor=0)
    with pytest.raises(ValueError, match="decay schedule must be one of"):
        MultiScaleRetention(16, 2, decay="cosine")
    with pytest.raises(TypeError, match="decay must be float32 or float64"):
        MultiScaleRetention(16, 2, decay=torch.tensor([0.9, 0.99], dtype=torch.float16))
    with pytest.raises(ValueError, match=r"every gamma in decay must lie in \(0, 1\)"):
        MultiScaleRetention(16, 2, decay=[0.9, 1.0])
    with pytest.raises(ValueError, match="rotary needs an even head dim, got dim_model / num_heads = 5"):
        MultiScaleRetention(15, 3)
    MultiScaleRetention(15, 3, rotary=False)  # odd head dims are fine without rotary

    layer, x = msr(), x_(2, 6)
    cases = [
        ({"num_chunks": 7}, r"num_chunks must be an integer in \[1, T=6\]"),
        ({"num_chunks": 0}, r"num_chunks must be an integer in \[1, T=6\]"),
        ({"num_chunks": 2, "mode": "recurrent"}, "num_chunks=2 asks for the chunkwise form"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"mode": "chunkwise", "chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"attn_mask": "full"}, "attn_mask must be 'causal' or None"),
        ({"padding_mask": torch.tensor([[1, 1, 1, 1, 0, 0]] * 2)}, "padding_mask must be left padding"),
        ({"padding_mask": torch.ones(2, 5)}, r"padding_mask must be \(batch, 6\)"),
        ({"state": RetentionState.zeros(2, 3, 4, 8)}, "state has S"),
        ({"state": RetentionState.zeros(1, 4, 4, 8)}, "state has S"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            layer(x, **kwargs)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, dim_model\)"):
        layer(x[0])


def test_training_keeps_eleven_d_floats_per_token():
    """What one MSR layer keeps for its backward pass, per token (d = 32, value_factor 2, so every value-side
    tensor is 2d wide): the input x (d), q and k (2d), v (2d), g (2d), the normalized output (2d) and the output
    projection's input (2d): 11d, plus 1/std per head, the rotation phases and the state entering each chunk.
    Autograd through the plain ops kept ~36d at 64-token chunks (every chunk's scores, the gate's input and output)."""
    d = 32
    msr = MultiScaleRetention(d, 4)
    params = {p.untyped_storage().data_ptr() for p in msr.parameters()}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    T = 256
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        msr(torch.randn(1, T, d, requires_grad=True), mode="chunkwise", chunk_size=64)
    floats_per_token = sum(saved.values()) / 4 / T
    assert 11 * d <= floats_per_token <= 11 * d + 24


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 5e-2), (torch.float16, 1e-2), (torch.float32, 1e-5)])
def test_training_gradients_in_every_dtype(dtype, tol):
    """Forward and backward through the hand-written paths (chunkwise backward, fused gate and norm) in each dtype
    against the float64 module with the same weights: output, input gradient and two weight gradients."""
    torch.manual_seed(0)
    reference = MultiScaleRetention(64, 4).double()
    module = MultiScaleRetention(64, 4).to(dtype)
    module.load_state_dict({k: v.to(dtype) for k, v in reference.state_dict().items()})
    x = torch.randn(2, 300, 64, dtype=torch.float64)
    results = []
    for msr, inputs in ((reference, x.clone()), (module, x.to(dtype))):
        inputs.requires_grad_()
        y = msr(inputs, mode="chunkwise", chunk_size=64)
        y.float().pow(2).sum().backward()
        results.append([t.double() for t in (y, inputs.grad, msr.q_proj.weight.grad, msr.head_norm.weight.grad)])
    for want, got in zip(*results, strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() < tol
