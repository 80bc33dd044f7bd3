"""The chunkwise kernels against the float64 reference: outputs, row sums, state, and all gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_checks import DEVICE, TOL, rel_err

from retentive.ops import log_gamma, reference
from retentive.ops.triton import chunkwise, common


def check_chunkwise(B, H, T, Dk, Dv, chunk_size, with_rowsum, with_state, dtype, seed=0, starts=None):
    """Forward and backward of the kernel against reference.chunkwise in float64, on the same inputs; ``starts``
    (B, T) bool packs documents into the rows."""
    gen = torch.Generator().manual_seed(seed)
    starts = None if starts is None else starts.to(DEVICE)
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for d in (Dk, Dk, Dv))
    q = q * Dk**-0.5
    S, z = torch.randn(B, H, Dk, Dv, generator=gen), torch.randn(B, H, Dk, generator=gen)
    log_g = log_gamma("linspace", H)
    inputs = [x.to(DEVICE, dtype) for x in (q, k, v)] + [x.to(DEVICE) for x in (S, z)]
    ours = [x.detach().requires_grad_(with_state or i < 3) for i, x in enumerate(inputs)]
    truth = [x.double().detach().requires_grad_(with_state or i < 3) for i, x in enumerate(inputs)]
    state = (lambda xs: (xs[3], xs[4])) if with_state else (lambda xs: (None, None))
    kw = dict(chunk_size=chunk_size, with_rowsum=with_rowsum, starts=starts)
    got = chunkwise(*ours[:3], log_g.to(DEVICE).float(), *state(ours), **kw)
    want = reference.chunkwise(*truth[:3], log_g.to(DEVICE), *state(truth), **kw)

    tol = TOL[dtype]
    for name, a, b in zip(("o", "r", "S", "z"), got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, name
            assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.2e}"
    assert got.S.dtype == got.z.dtype == torch.float32

    weights = [torch.randn(x.shape, generator=gen).to(DEVICE) for x in (want.o, want.S, want.z)]  # a random loss
    if with_rowsum:
        weights.append(torch.randn(want.r.shape, generator=gen).to(DEVICE))

    def loss(p):
        outs = (p.o, p.S, p.z) + ((p.r,) if with_rowsum else ())
        return sum((x.double() * w).sum() for x, w in zip(outs, weights, strict=True))

    loss(got).backward()
    loss(want).backward()
    for name, a, b in zip(("dq", "dk", "dv", "dS", "dz"), ours, truth, strict=False):
        if b.grad is not None:
            assert rel_err(a.grad, b.grad) <= tol, f"{name}: {rel_err(a.grad, b.grad):.2e}"


@pytest.mark.parametrize(
    "T,Dk,Dv,chunk_size,with_rowsum,with_state",
    [
        (1, 8, 12, 64, False, False),  # one token
        (37, 8, 12, 5, True, True),  # chunk size not dividing T, everything on
        (9, 24, 20, 1, True, False),  # 1-token chunks
        (130, 16, 16, 64, False, True),  # three chunks, the last short
        (70, 100, 36, 200, True, True),  # chunk size > T (the parallel form), odd head dims
    ],
)
def test_float32(T, Dk, Dv, chunk_size, with_rowsum, with_state):
    check_chunkwise(1, 2, T, Dk, Dv, chunk_size, with_rowsum, with_state, torch.float32)


def test_head_dims_of_retnet():
    """dk 256 and dv 512 (retnet-1.3b) loop over several Dk tiles and split Dv over programs."""
    check_chunkwise(1, 1, 5, 256, 512, 4, True, True, torch.float32)


def test_128_token_chunks(monkeypatch):
    """Chunks of 128 tokens (a 128-row score tile), which the GPU check times against the library's 64: right
    too, the last chunk short, every normalization and a carried state on."""
    monkeypatch.setattr(common, "MAX_CHUNK", 128)
    check_chunkwise(1, 2, 300, 32, 40, 128, True, True, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    check_chunkwise(2, 2, 45, 32, 48, 16, True, True, dtype)


def document_starts(B: int, T: int, at: list[int], seed: int = 0) -> torch.Tensor:
    """(B, T) bool: starts at the positions ``at`` in row 0, at random (1 in 6) in the others."""
    starts = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 1 / 6
    starts[0] = False
    starts[0, at] = True
    return starts


@pytest.mark.parametrize(
    "B,T,chunk_size,at,dtype",
    [
        (2, 37, 5, [0, 3, 4, 15, 36], torch.float32),  # a one-token document; a start on a chunk's first; the last
        (2, 130, 64, [64, 100, 101, 127], torch.float32),  # starts at 64 and inside the short last chunk
        (3, 45, 16, [1, 2, 30], torch.bfloat16),
    ],
)
def test_packed_documents(B, T, chunk_size, at, dtype):
    """Rows that pack documents: every factor that would cross a start is 0, in all five kernels (outputs, row
    sums, the state after the last document, and every gradient, that of the carried state included)."""
    check_chunkwise(B, 2, T, 16, 24, chunk_size, True, True, dtype, starts=document_starts(B, T, at))


@settings(max_examples=4, deadline=None)
@given(
    T=st.integers(1, 60),
    Dk=st.sampled_from([4, 16, 24]),
    Dv=st.sampled_from([8, 20]),
    chunk_size=st.integers(3, 70),
    with_rowsum=st.booleans(),
    with_state=st.booleans(),
    documents=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(T, Dk, Dv, chunk_size, with_rowsum, with_state, documents, seed):
    starts = torch.rand(2, T, generator=torch.Generator().manual_seed(seed)) < 0.1 if documents else None
    check_chunkwise(2, 2, T, Dk, Dv, chunk_size, with_rowsum, with_state, torch.float32, seed, starts)


def test_causal():
    """Changing token j changes no output before j (SPEC §7), across chunk boundaries."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, d, generator=gen).to(DEVICE) for d in (16, 16, 16))
    log_g = log_gamma("retnet", 2).to(DEVICE).float()
    before = chunkwise(q, k, v, log_g, None, None, chunk_size=16, with_rowsum=True)
    j = 21
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, j] += 1.0
    after = chunkwise(q2, k2, v2, log_g, None, None, chunk_size=16, with_rowsum=True)
    assert torch.equal(after.o[:, :, :j], before.o[:, :, :j]) and torch.equal(after.r[:, :, :j], before.r[:, :, :j])
    assert not torch.equal(after.o[:, :, j], before.o[:, :, j])
