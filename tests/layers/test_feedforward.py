"""FeedForward: plain and gated variants, by their formulas."""

import pytest
import torch
import torch.nn.functional as F

from retentive.layers import ACTIVATIONS, FeedForward

EXPECTED = {
    "gelu": lambda ffn, x: ffn.down(F.gelu(ffn.up(x))),
    "relu": lambda ffn, x: ffn.down(F.relu(ffn.up(x))),
    "swish": lambda ffn, x: ffn.down(F.silu(ffn.up(x))),
    "glu": lambda ffn, x: ffn.down(torch.sigmoid(ffn.gate(x)) * ffn.up(x)),
    "reglu": lambda ffn, x: ffn.down(F.relu(ffn.gate(x)) * ffn.up(x)),
    "geglu": lambda ffn, x: ffn.down(F.gelu(ffn.gate(x)) * ffn.up(x)),
    "swiglu": lambda ffn, x: ffn.down(F.silu(ffn.gate(x)) * ffn.up(x)),
}


def test_every_activation_has_a_formula_here():
    assert set(ACTIVATIONS) == set(EXPECTED)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
def test_formula_shapes_and_bias(activation, bias):
    torch.manual_seed(0)
    ffn = FeedForward(12, 40, activation, bias, dtype=torch.float64)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(ffn(x), EXPECTED[activation](ffn, x), rtol=0, atol=0)
    assert ffn.up.out_features == ffn.down.in_features == 40 and ffn(x).shape == x.shape
    assert (ffn.gate is not None) == activation.endswith("glu")
    assert all(m.bias is None for m in (ffn.up, ffn.down)) != bias


@pytest.mark.parametrize("hidden_norm", ["layernorm", "rmsnorm"])
def test_hidden_norm_sits_between_the_activation_and_the_down_projection(hidden_norm):
    torch.manual_seed(0)
    ffn = FeedForward(12, 40, "gelu", hidden_norm=hidden_norm, norm_eps=1e-6, dtype=torch.float64)
    torch.nn.init.normal_(ffn.norm.weight)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    h = F.gelu(ffn.up(x))
    if hidden_norm == "layernorm":
        h = F.layer_norm(h, (40,), ffn.norm.weight, ffn.norm.bias, eps=1e-6)
    else:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * ffn.norm.weight
    torch.testing.assert_close(ffn(x), ffn.down(h), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="hidden_norm"):
        FeedForward(12, 40, hidden_norm="batchnorm")


def test_dropout_on_the_hidden_layer_only_in_training():
    ffn = FeedForward(8, 16, dropout=0.5)
    x = torch.randn(3, 4, 8)
    ffn.eval()
    torch.testing.assert_close(ffn(x), ffn(x), rtol=0, atol=0)
    ffn.train()
    assert not torch.equal(ffn(x), ffn(x))


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match="activation must be one of"):
        FeedForward(8, 16, "tanh")
    with pytest.raises(ValueError, match="hidden_dim must be >= 1"):
        FeedForward(8, 0)
