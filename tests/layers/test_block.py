"""RetNetBlock: pre-norm residuals, the SPEC's 12 d^2 parameter budget, forms and state."""

import pytest
import torch

from retentive.layers import RetNetBlock

F64 = torch.float64


def block(**kwargs) -> RetNetBlock:
    torch.manual_seed(0)
    return RetNetBlock(16, 4, 32, dtype=F64, **kwargs)


def test_pre_norm_residual_formula():
    b, x = block(), torch.randn(2, 9, 16, dtype=F64)
    y = x + b.retention(b.norm1(x))
    torch.testing.assert_close(b(x), y + b.ffn(b.norm2(y)), rtol=1e-14, atol=1e-14)


def test_twelve_d_squared_weights_per_layer():
    """value_factor 2 and FFN 2d: 8 d^2 in retention + 4 d^2 in the FFN (SPEC §5)."""
    d = 64
    b = RetNetBlock(d, 4, 2 * d, value_factor=2, ffn_bias=False)
    matrices = sum(p.numel() for p in b.parameters() if p.dim() == 2)
    assert matrices == 12 * d * d


@pytest.mark.parametrize("normalize", [False, True])
def test_forms_agree_and_the_state_streams(normalize):
    b, x = block(), torch.randn(2, 21, 16, dtype=F64)
    kw = {"normalize_attn": normalize, "normalize_retn": normalize}
    want, want_state = b(x, return_state=True, **kw)
    for form in ({"mode": "chunkwise", "chunk_size": 4}, {"mode": "recurrent"}, {"num_chunks": 21}):
        torch.testing.assert_close(b(x, **form, **kw), want, rtol=1e-10, atol=1e-10)
    y1, state = b(x[:, :13], mode="chunkwise", chunk_size=5, return_state=True, **kw)
    y2, state = b(x[:, 13:], mode="recurrent", state=state, return_state=True, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.S, want_state.S, rtol=1e-10, atol=1e-10)


def test_dropout_only_in_training():
    b, x = block(dropout=0.3), torch.randn(1, 7, 16, dtype=F64)
    b.eval()
    torch.testing.assert_close(b(x), b(x), rtol=0, atol=0)
    b.train()
    assert not torch.equal(b(x), b(x))


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match="activation must be one of"):
        RetNetBlock(16, 4, 32, ffn_activation="tanh")
    with pytest.raises(ValueError, match="gate_fn must be one of"):
        RetNetBlock(16, 4, 32, gate_fn="tanh")
    with pytest.raises(ValueError, match=r"dim_model \(16\) must be a positive multiple of num_heads \(3\)"):
        RetNetBlock(16, 3, 32)
