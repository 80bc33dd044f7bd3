"""The fused gate ⊙ GroupNorm (layers/gated_norm.py) against the unfused ops, values and gradients, eager and
through torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retentive.layers import gated_norm
from retentive.layers.gated_norm import COMPILE_MIN_NUMEL, FUSED_GATES, gated_head_norm

F64 = torch.float64


def unfused(o, g, weight, bias, gate, eps):
    y = F.layer_norm(o.transpose(1, 2), o.shape[-1:], eps=eps).flatten(-2)
    if weight is not None:
        y = y * weight + bias
    return FUSED_GATES[gate][0](g) * y


def check_against_unfused(gate, affine, dtype, tol, compile, traced=False):
    B, H, T, Dv = 2, 3, 11, 8
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_()

    o, g = rand(B, H, T, Dv), rand(B, T, H * Dv)
    weight, bias = (rand(H * Dv), rand(H * Dv)) if affine else (None, None)
    dout = torch.randn(B, T, H * Dv, generator=gen, dtype=F64).to(dtype)
    leaves = [t for t in (o, g, weight, bias) if t is not None]
    results = []
    fused = lambda *a: gated_head_norm(*a, compile=compile)
    for fn in (torch.compile(fused, backend="aot_eager") if traced else fused, unfused):
        out = fn(o, g, weight, bias, gate, 1e-6)
        results.append([out, *torch.autograd.grad(out, leaves, dout)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("gate", sorted(FUSED_GATES))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_fused_matches_unfused(gate, affine, dtype, tol):
    check_against_unfused(gate, affine, dtype, tol, compile=False)


# each case compiles both passes (seconds): the two gate kinds, with and without affine, both dtypes
@pytest.mark.parametrize("gate,affine,dtype,tol", [("swish", True, torch.float32, 1e-5), ("gelu", False, F64, 1e-12)])
def test_compiled_matches_unfused(gate, affine, dtype, tol):
    check_against_unfused(gate, affine, dtype, tol, compile=True)


@pytest.mark.parametrize("affine", [True, False])
def test_traced_inside_a_compiled_model_matches_unfused(affine):
    """Traced by ``torch.compile`` as part of a model (autograd Function and all; aot_eager: no code generation):
    the same output and gradients. torch 2.11 gave zero gradients while the forward wrote its output in place."""
    check_against_unfused("swish", affine, torch.float32, 1e-5, compile=False, traced=True)


def test_compile_failure_falls_back_to_the_eager_ops(monkeypatch):
    def broken(fn):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(gated_norm, "_compiled", broken)
    monkeypatch.setattr(gated_norm, "_compile_failed", False)
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
        check_against_unfused("swish", True, torch.float32, 1e-5, compile=True)
    assert gated_norm._compile_failed  # not tried again: the next call is silent
    check_against_unfused("swish", True, torch.float32, 1e-5, compile=True)


def test_compile_by_default_on_large_cpu_inputs(monkeypatch):
    small, large = torch.empty(COMPILE_MIN_NUMEL - 1), torch.empty(COMPILE_MIN_NUMEL)
    monkeypatch.delenv("RETENTIVE_COMPILE_NORM", raising=False)
    assert (gated_norm._compile_by_default(small), gated_norm._compile_by_default(large)) == (False, True)
    assert not gated_norm._compile_by_default(torch.empty(COMPILE_MIN_NUMEL, device="meta"))
    monkeypatch.setenv("RETENTIVE_COMPILE_NORM", "0")
    assert not gated_norm._compile_by_default(large)
    monkeypatch.setenv("RETENTIVE_COMPILE_NORM", "1")
    assert gated_norm._compile_by_default(small)
    monkeypatch.setenv("RETENTIVE_COMPILE_NORM", "yes")
    with pytest.raises(ValueError, match="RETENTIVE_COMPILE_NORM must be 0, 1 or unset, got 'yes'"):
        gated_norm._compile_by_default(small)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_stays_near_float64(dtype, tol, compile):
    """Relative to the unfused ops in float64 on the same (rounded) inputs: output and every gradient."""
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*shape, generator=gen).to(dtype) for shape in ((2, 3, 11, 8), (2, 11, 24), (24,), (24,))]
    dout = torch.randn(2, 11, 24, generator=gen).to(dtype)

    def run(fn, work):
        leaves = [t.to(work).requires_grad_() for t in inputs]
        out = fn(*leaves, "swish", 1e-6)
        return [out, *torch.autograd.grad(out, leaves, dout.to(work))]

    want = run(unfused, F64)
    got = run(lambda *args: gated_head_norm(*args, compile=compile), dtype)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        assert (g.double() - w).abs().max() <= tol * w.abs().max()


@pytest.fixture
def cuda_autocast_policy():
    """CPU autocast runs ``native_layer_norm`` as CUDA autocast does, in float32 (its fp32 list): the CPU's own
    policy leaves it in bf16, which hid the CUDA failure of the fused backward."""

    def native_layer_norm(x, shape, weight, bias, eps):
        with torch.autocast("cpu", enabled=False):
            weight, bias = (None if t is None else t.float() for t in (weight, bias))
            return torch.ops.aten.native_layer_norm(x.float(), shape, weight, bias, eps)

    with torch.library._scoped_library("aten", "IMPL") as lib:
        lib.impl("native_layer_norm", native_layer_norm, "AutocastCPU")
        yield


def check_mixed_against_unfused(o_dtype, autocast):
    """o and g as given (g bf16), float32 weight and bias, a float32 gradient: what a model under autocast hands
    the node. Fused and unfused agree within bf16 rounding, in dtypes too."""
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2, 3, 11, 8, generator=gen).to(o_dtype), torch.randn(2, 11, 24, generator=gen).bfloat16()]
    inputs += [torch.randn(24, generator=gen) for _ in range(2)]
    dout = torch.randn(2, 11, 24, generator=gen)
    results = []
    for fn in (lambda *a: gated_head_norm(*a, compile=False), unfused):
        leaves = [t.detach().requires_grad_() for t in inputs]
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = fn(*leaves, "swish", 1e-6)
        results.append([out, *torch.autograd.grad(out, leaves, dout)])
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.mark.parametrize("policy", ["cpu", "cuda"])
def test_autocast_matches_the_unfused_ops(policy, request):
    if policy == "cuda":
        request.getfixturevalue("cuda_autocast_policy")
    check_mixed_against_unfused(torch.bfloat16, autocast=True)


def test_a_float32_norm_beside_a_bf16_gate_matches_the_unfused_ops():
    """The mix that CUDA autocast made inside the node (x̂ float32, the gate's gradient bf16), without autocast."""
    check_mixed_against_unfused(torch.float32, autocast=False)
