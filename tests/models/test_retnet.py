"""The RetNet backbone with the seed repository's arguments: forms agree, causal, streams, pads (SPEC §5, §7)."""

import itertools
from unittest import mock

import pytest
import torch

from retentive import RetNet
from retentive.ops import RetentionState, log_gamma

F64 = torch.float64
NORMS = list(itertools.product([False, True], repeat=2))
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def seed_net(**kwargs) -> RetNet:
    """RetNet(num_layer, num_heads, dim_model, dropout, value_factor, msr_gate_fn, mlp_gate_fn, mlp_mult, mlp_bias)."""
    torch.manual_seed(0)
    return RetNet(2, 4, 32, 0.0, 2, "gelu", "gelu", 4, True, **kwargs).double()


def x_(B: int, T: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(B, T, 32, dtype=F64)


def test_seed_arguments_build_the_documented_shapes():
    net = RetNet(
        num_layer=3,
        num_heads=4,
        dim_model=32,
        dropout=0.1,
        value_factor=2,
        msr_gate_fn="gelu",
        mlp_gate_fn="gelu",
        mlp_mult=4,
        mlp_bias=True,
    )
    assert len(net.blocks) == 3
    for b in net.blocks:
        assert b.ffn.up.out_features == 4 * 32  # mlp_mult is a multiple of dim_model, not the width itself
        assert b.ffn.up.bias is not None and b.retention.gate_fn == "gelu"
        assert b.retention.value_dim == 2 * 32 // 4 and b.dropout.p == 0.1
    assert RetNet(1, 2, 32, mlp_mult=2, mlp_bias=False).blocks[0].ffn.up.bias is None


@pytest.mark.parametrize("normalize_attn,normalize_retn", NORMS)
def test_num_chunks_agree_with_parallel_for_every_normalization(normalize_attn, normalize_retn):
    net, x = seed_net(), x_(2, 30)
    want = net(x, "causal", None, normalize_attn, normalize_retn)
    for num_chunks in (1, 8, 30):
        got = net(
            x, attn_mask="causal", num_chunks=num_chunks, normalize_attn=normalize_attn, normalize_retn=normalize_retn
        )
        torch.testing.assert_close(got, want, **TIGHT)
    rec = net(x, mode="recurrent", normalize_attn=normalize_attn, normalize_retn=normalize_retn)
    torch.testing.assert_close(rec, want, **TIGHT)


def test_attn_mask_none_is_bidirectional_in_every_form():
    net, x = seed_net(), x_(1, 12)
    y = net(x, attn_mask=None)
    for num_chunks in (1, 5, 12):
        torch.testing.assert_close(net(x, attn_mask=None, num_chunks=num_chunks), y, **TIGHT)
    x2 = x.clone()
    x2[:, -1] += torch.randn_like(x2[:, -1])  # not a constant shift: LayerNorm would erase it
    assert (net(x2, attn_mask=None)[:, 0] - y[:, 0]).abs().max() > 1e-6


def test_causality():
    net, x = seed_net(normalize_attn=True, normalize_retn=True), x_(2, 16)
    for form in ({}, {"num_chunks": 4}, {"mode": "recurrent"}):
        y = net(x, **form)
        for j in (0, 6, 15):
            x2 = x.clone()
            x2[:, j] += torch.randn_like(x2[:, j])
            y2 = net(x2, **form)
            torch.testing.assert_close(y2[:, :j], y[:, :j], rtol=0, atol=1e-12)
            assert (y2[:, j] - y[:, j]).abs().max() > 1e-6


def test_chunkwise_prefill_then_recurrent_decode_with_left_padding():
    """Two prompts of 9 and 13 tokens, the short one left-padded: prefill, then 5 decode steps, each row as alone."""
    net = seed_net(normalize_attn=True, normalize_retn=True)
    long, short, steps = x_(1, 13, seed=2), x_(1, 9, seed=3), x_(2, 5, seed=4)
    batch = torch.cat([torch.cat([torch.randn(1, 4, 32, dtype=F64), short], dim=1), long])
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, :4] = False
    y, state = net(batch, mode="chunkwise", chunk_size=4, padding_mask=mask, return_state=True)
    outs, s = [], state
    for t in range(5):
        o, s = net(steps[:, t : t + 1], mode="recurrent", state=s, return_state=True)
        outs.append(o)
    decoded = torch.cat(outs, dim=1)
    for row, prompt in ((0, short), (1, long)):
        whole = net(torch.cat([prompt, steps[row : row + 1]], dim=1))
        n = prompt.shape[1]
        torch.testing.assert_close(y[row : row + 1, 13 - n :], whole[:, :n], **TIGHT)
        torch.testing.assert_close(decoded[row : row + 1], whole[:, n:], **TIGHT)
    assert [st.offset.tolist() for st in s] == [[14, 18]] * 2


def test_to_bfloat16_keeps_every_gamma():
    net = RetNet(2, 8, 64)
    gammas = [log_gamma(b.retention.decay, 8).exp() for b in net.blocks]
    net = net.to(torch.bfloat16)
    for b, g in zip(net.blocks, gammas, strict=True):
        torch.testing.assert_close(log_gamma(b.retention.decay, 8).exp(), g, rtol=0, atol=0)
        assert (g < 1).all() and g.max() == 1 - 2**-12
    y = net(torch.randn(1, 50, 64, dtype=torch.bfloat16), mode="chunkwise", chunk_size=16)
    assert y.dtype == torch.bfloat16 and y.isfinite().all()


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match="num_layer must be >= 1"):
        RetNet(0, 2, 16)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        RetNet(1, 2, 16, dropout=1.0)
    with pytest.raises(ValueError, match="mlp_mult \\* dim_model must be >= 1"):
        RetNet(1, 2, 16, mlp_mult=0)
    with pytest.raises(ValueError, match=r"dim_model \(16\) must be a positive multiple of num_heads \(3\)"):
        RetNet(1, 3, 16)
    with pytest.raises(ValueError, match="gate_fn must be one of"):
        RetNet(1, 2, 16, msr_gate_fn="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        RetNet(1, 2, 16, mlp_gate_fn="tanh")
    net, x = seed_net(), x_(1, 6)
    with pytest.raises(ValueError, match=r"state must hold one RetentionState per block \(2\), got 1"):
        net(x, state=[RetentionState.zeros(1, 4, 8, 16)])
    with pytest.raises(ValueError, match="num_chunks must be an integer in"):
        net(x, num_chunks=7)
    with pytest.raises(ValueError, match=r"value_dim must be a positive multiple of num_heads \(2\), got 33"):
        RetNet(1, 2, 16, value_dim=33)
    with pytest.raises(ValueError, match="rotary_layout must be one of"):
        RetNet(1, 2, 16, rotary_layout="pairs")
    with pytest.raises(ValueError, match="rotary_angles must be one of"):
        RetNet(1, 2, 16, rotary_angles="xpos")
    with pytest.raises(ValueError, match="a head norm weight needs head_norm 'rmsnorm' or 'layernorm'"):
        RetNet(1, 2, 16, head_norm_weight=True)
    with pytest.raises(ValueError, match="norm must be 'layernorm' or 'rmsnorm'"):
        RetNet(1, 2, 16, norm="batchnorm")


STEP_CONFIGS = [
    {},  # the paper's: swish gate, GroupNorm per head, rotary, fused [q k | v | g] projection
    {"normalize_attn": True, "normalize_retn": True, "msr_bias": True, "msr_gate_fn": "gelu"},
    {"msr_gate_fn": "none", "head_norm": "none", "rotary": False, "decay": "linspace", "layer_scale": 0.1},  # ViR
    {"head_norm": "rmsnorm", "value_factor": 1, "mlp_gate_fn": "swiglu"},
    {"head_norm": "rmsnorm", "head_norm_weight": True, "rotary_layout": "halves", "rotary_angles": "rope"},  # fla
]

# the options of the public checkpoints (models/convert), each with the normalizations torchscale uses
CHECKPOINT_OPTIONS = [
    {"norm": "rmsnorm", "head_norm": "rmsnorm", "value_dim": 72, "mlp_gate_fn": "reglu"},  # torchscale 2023-09-28
    {"head_norm": "layernorm", "ffn_norm": "layernorm", "msr_bias": True, "head_norm_eps": 1e-5},  # before
    {"norm": "rmsnorm", "ffn_norm": "rmsnorm", "head_norm": "layernorm", "head_norm_weight": True},
    {"head_norm": "rmsnorm", "head_norm_weight": True, "rotary_layout": "halves", "rotary_angles": "rope"},  # fla
    {"rotary_layout": "halves", "rotary_base": 500.0},
]


@pytest.mark.parametrize("kwargs", CHECKPOINT_OPTIONS)
@pytest.mark.parametrize("normalize", [False, True])
def test_checkpoint_options_keep_every_form_and_stream_exact(kwargs, normalize):
    torch.manual_seed(0)
    net = RetNet(2, 4, 32, normalize_attn=normalize, normalize_retn=normalize, **kwargs).double()
    for p in net.parameters():  # norm weights other than 1, so that a misplaced weight shows
        p.data.add_(torch.randn_like(p) * 0.1)
    x = x_(2, 30)
    want = net(x)
    for form in ({"num_chunks": 4}, {"mode": "chunkwise", "chunk_size": 7}, {"mode": "recurrent"}):
        torch.testing.assert_close(net(x, **form), want, **TIGHT)
    head, state = net(x[:, :11], mode="chunkwise", chunk_size=4, return_state=True)
    tail = net(x[:, 11:], mode="recurrent", state=state)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), want, **TIGHT)


def test_checkpoint_options_default_to_the_paper_model():
    """Every option the converters added defaults to what RetNet built before them: same keys, same output."""
    torch.manual_seed(0)
    plain = RetNet(2, 4, 32)
    torch.manual_seed(0)
    explicit = RetNet(
        2, 4, 32, norm="layernorm", ffn_norm="none", value_dim=64, head_norm_weight=False, head_norm_eps=1e-6,
        rotary_layout="interleaved", rotary_angles="retnet", rotary_base=10000.0,
    )  # fmt: skip
    assert plain.state_dict().keys() == explicit.state_dict().keys()
    assert all(isinstance(b.norm1, torch.nn.LayerNorm) and b.ffn.norm is None for b in plain.blocks)
    x = x_(1, 9).float()
    torch.testing.assert_close(plain(x), explicit(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", STEP_CONFIGS)
def test_decoding_step_matches_the_recurrent_form(kwargs):
    """In eval mode without gradients one token takes RetNet.step; it equals the general recurrent path."""
    torch.manual_seed(0)
    net = RetNet(2, 4, 32, **kwargs).double().eval()
    prompt, steps = x_(2, 7, seed=5), x_(2, 4, seed=6)
    with torch.no_grad():
        _, state = net(prompt, mode="chunkwise", chunk_size=3, return_state=True)
    fast, slow = state, state
    with mock.patch.object(RetNet, "decode_step", side_effect=RetNet.decode_step, autospec=True) as step:
        for t in range(steps.shape[1]):
            x = steps[:, t : t + 1]
            with torch.no_grad():
                y_fast, fast = net(x, mode="recurrent", state=fast, return_state=True)
            with torch.enable_grad():  # recording gradients: the general path
                y_slow, slow = net(x, mode="recurrent", state=slow, return_state=True)
            torch.testing.assert_close(y_fast, y_slow.detach(), **TIGHT)
            for a, b in zip(fast, slow, strict=True):
                torch.testing.assert_close((a.S, a.z), (b.S.detach(), b.z.detach()), **TIGHT)
                assert torch.equal(a.offset, b.offset)
    assert step.call_count == steps.shape[1]


def test_from_options_builds_the_seed_model_in_the_config_names():
    """The library's way in (the config's names) and the seed's signature build the same module, weights included."""
    torch.manual_seed(0)
    seed = RetNet(2, 4, 32, 0.1, 2, "gelu", "relu", 3, False, normalize_attn=True, head_norm="rmsnorm")
    torch.manual_seed(0)
    ours = RetNet.from_options(
        2, 4, 32, 96, dropout=0.1, gate_fn="gelu", ffn_activation="relu", ffn_bias=False, normalize_decay=True,
        head_norm="rmsnorm",
    )  # fmt: skip
    assert str(ours) == str(seed)
    for (name, a), (_, b) in zip(seed.state_dict().items(), ours.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert all(b.retention.normalize_decay for b in ours.blocks)


def test_the_form_is_resolved_once_per_call():
    from retentive.layers import Form

    net, x = seed_net(), x_(2, 12)
    with mock.patch.object(Form, "resolve", side_effect=Form.resolve) as resolve:
        net(x, mode="chunkwise", chunk_size=5)
    assert resolve.call_count == 1  # by the backbone, not again by each of its 2 layers
