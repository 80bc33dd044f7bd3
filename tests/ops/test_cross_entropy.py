"""linear_cross_entropy (ops/cross_entropy.py) against autograd through F.cross_entropy(F.linear(...))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from retentive.ops import linear_cross_entropy

F64 = torch.float64


def make(N: int, V: int, d: int, bias: bool, ignored: float, dtype: torch.dtype, seed: int = 0):
    """hidden (N, d), weight (V, d), bias (V,) or None as leaves; targets (N,) with a share of -100."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(shape, generator=g, dtype=F64) for shape in ((N, d), (V, d), (V,))[: 2 + bias]]
    leaves = [(t * 2).to(dtype).requires_grad_() for t in leaves]
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = -100
    return leaves, targets


def loss_and_grads(fn, leaves, targets):
    loss = fn(leaves, targets)
    return [loss, *torch.autograd.grad(3 * loss, leaves)]  # a grad_output other than 1


def fused(leaves, targets, block_size=None, reduction="mean"):
    h, w, *b = leaves
    return linear_cross_entropy(h, w, targets, *b, block_size=block_size, reduction=reduction)


def reference(leaves, targets, reduction="mean"):
    h, w, *b = leaves
    logits = F.linear(h, w, *b)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction=reduction)


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 40),
    V=st.integers(1, 30),
    d=st.integers(1, 9),
    bias=st.booleans(),
    ignored=st.sampled_from([0.0, 0.3]),
    block_size=st.integers(1, 50),
)
def test_loss_and_gradients_match_autograd_float64(N, V, d, bias, ignored, block_size):
    leaves, targets = make(N, V, d, bias, ignored, F64, seed=N * V)
    targets[0] = 0  # at least one row counts: an all-ignored batch is NaN in both (tested below)
    got = loss_and_grads(lambda x, t: fused(x, t, block_size), leaves, targets)
    for g, w in zip(got, loss_and_grads(reference, leaves, targets), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_is_as_close_to_float64_as_autograd_is(dtype):
    """float32 and bf16: loss and gradients no farther from float64 than the reference's own in that dtype
    (float32: both within 1e-5 of the largest entry; bf16 logits carry ~1% errors whatever the method)."""
    leaves, targets = make(300, 500, 32, True, 0.1, F64)
    exact = loss_and_grads(reference, leaves, targets)
    low = [t.detach().to(dtype).requires_grad_() for t in leaves]
    got = loss_and_grads(lambda x, t: fused(x, t, 64), low, targets)
    base = loss_and_grads(reference, low, targets)
    assert got[0].dtype == torch.float32 and [g.dtype for g in got[1:]] == [dtype] * 3
    for g, b, e in zip(got, base, exact, strict=True):
        err, base_err = ((t.double() - e).abs().max().item() / e.abs().max().item() for t in (g, b))
        assert err <= max(1.5 * base_err, 1e-5), (err, base_err)


def test_no_grad_gives_the_loss_and_all_ignored_gives_nan():
    leaves, targets = make(20, 7, 4, False, 0.2, F64)
    with torch.no_grad():
        torch.testing.assert_close(fused(leaves, targets, 3), reference(leaves, targets))
    ignored = torch.full_like(targets, -100)
    assert fused(leaves, ignored).isnan() and reference(leaves, ignored).isnan()


def test_keeps_no_logits_for_the_backward():
    """What autograd keeps is dL/dhidden and dL/dweight: (N + V) * d floats, never N * V."""
    leaves, targets = make(512, 256, 8, False, 0.0, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fused(leaves, targets, 64)
    assert 0 < sum(saved) <= (512 + 256) * 8 + 1


def test_bad_arguments_are_named():
    leaves, targets = make(6, 5, 4, False, 0.0, F64)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_cross_entropy(leaves[0][None], leaves[1], targets)
    with pytest.raises(ValueError, match="targets must be int64"):
        linear_cross_entropy(leaves[0], leaves[1], targets.int())
    with pytest.raises(ValueError, match="block_size must be"):
        linear_cross_entropy(leaves[0], leaves[1], targets, block_size=0)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        linear_cross_entropy(leaves[0], leaves[1], targets, reduction="none")


@pytest.mark.parametrize("ignored", [0.0, 0.4, 1.0])
def test_the_sum_reduction_matches_autograd_and_is_zero_when_all_is_ignored(ignored):
    """``reduction="sum"`` (what a loss divided by the targets of a whole accumulated step needs): loss and
    gradients as F.cross_entropy's sum, in float64; every row ignored gives 0 and zero gradients, not NaN."""
    leaves, targets = make(23, 9, 5, True, ignored, F64, seed=5)
    got = loss_and_grads(lambda x, t: fused(x, t, 4, reduction="sum"), leaves, targets)
    for g, w in zip(got, loss_and_grads(lambda x, t: reference(x, t, "sum"), leaves, targets), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if ignored == 1.0:
        assert all(torch.count_nonzero(g) == 0 for g in got)


def test_compiles_into_one_graph_and_matches_eager():
    """No branch on the data (a language model's targets always end in an ignored position): torch.compile traces
    the loss and its gradients whole, so a compiled training step does not break its graph at the loss."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    targets[-1] = -100
    loss = lambda h, w: linear_cross_entropy(h, w, targets, block_size=5)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for targets_now in (targets, torch.randint(0, 11, (37,))):  # some ignored, then none
        targets.copy_(targets_now)
        want = torch.autograd.grad(loss(hidden, weight), (hidden, weight))
        got = torch.autograd.grad(compiled(hidden, weight), (hidden, weight))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
