"""The fused gate ⊙ GroupNorm (layers/gated_norm.py) against the unfused ops, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retentive.layers.gated_norm import FUSED_GATES, gated_head_norm

F64 = torch.float64


def unfused(o, g, weight, bias, gate, eps):
    y = F.layer_norm(o.transpose(1, 2), o.shape[-1:], eps=eps).flatten(-2)
    if weight is not None:
        y = y * weight + bias
    return FUSED_GATES[gate][0](g) * y


@pytest.mark.parametrize("gate", sorted(FUSED_GATES))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_fused_matches_unfused(gate, affine, dtype, tol):
    B, H, T, Dv = 2, 3, 11, 8
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_()

    o, g = rand(B, H, T, Dv), rand(B, T, H * Dv)
    weight, bias = (rand(H * Dv), rand(H * Dv)) if affine else (None, None)
    dout = torch.randn(B, T, H * Dv, generator=gen, dtype=F64).to(dtype)
    leaves = [t for t in (o, g, weight, bias) if t is not None]
    results = []
    for fn in (gated_head_norm, unfused):
        out = fn(o, g, weight, bias, gate, 1e-6)
        results.append([out, *torch.autograd.grad(out, leaves, dout)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
