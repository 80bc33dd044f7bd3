"""``retention(..., backend="triton")`` against the reference backend, and the dispatch itself."""

import importlib

import pytest
import torch
from triton_checks import DEVICE, TOL, rel_err

from retentive.ops import RetentionState, decode_step, log_gamma, retention
from retentive.ops.triton import decode_step_

retention_module = importlib.import_module("retentive.ops.retention")  # the module, not the function it exports


def inputs(B, H, T, Dk, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=gen).to(DEVICE, dtype) for d in (Dk, Dk, Dv)]


@pytest.mark.parametrize(
    "mode,chunk_size,causal,normalize",
    [
        ("parallel", 64, True, True),
        ("chunkwise", 7, True, False),
        ("chunkwise", 16, True, True),
        ("recurrent", 1, True, True),
        ("parallel", 64, False, True),  # bidirectional
    ],
)
def test_forms_match_reference(mode, chunk_size, causal, normalize):
    q, k, v = inputs(2, 3, 29, 16, 24, torch.float32)
    kw = dict(mode=mode, chunk_size=chunk_size, causal=causal, normalize_decay=normalize, normalize_retention=normalize)
    state = RetentionState.zeros(2, 3, 16, 24, offset=torch.tensor([3, 0]), device=DEVICE) if causal else None
    if state is not None:
        state.S.normal_(), state.z.normal_()
    kw.update(state=state, output_state=causal)
    got, got_state = retention(q, k, v, backend="triton", **kw)
    want, want_state = retention(q.double(), k.double(), v.double(), backend="torch", **kw)
    assert rel_err(got, want) <= TOL[torch.float32]
    if causal:
        assert rel_err(got_state.S, want_state.S) <= TOL[torch.float32]
        assert rel_err(got_state.z, want_state.z) <= TOL[torch.float32]
        assert torch.equal(got_state.offset, want_state.offset)


@pytest.mark.parametrize("mode,chunk_size", [("parallel", 64), ("chunkwise", 6), ("recurrent", 1)])
def test_packed_documents_match_reference(mode, chunk_size):
    """retention(..., starts=...) through the kernels, a carried state and both normalizations on: the outputs, the
    state and offset after the last document, against the PyTorch backend in float64."""
    B, H, T, Dk, Dv = 2, 3, 29, 16, 24
    q, k, v = inputs(B, H, T, Dk, Dv, torch.float32, seed=3)
    starts = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    starts[0, [5, 6, 18]] = True  # row 0 reads the state until token 5; row 1 is one document, continuing it
    state = RetentionState.zeros(B, H, Dk, Dv, offset=torch.tensor([3, 7]), device=DEVICE)
    state.S.normal_(), state.z.normal_()
    kw = dict(mode=mode, chunk_size=chunk_size, normalize_decay=True, normalize_retention=True, state=state)
    kw.update(starts=starts, output_state=True)
    got, got_state = retention(q, k, v, backend="triton", **kw)
    want, want_state = retention(q.double(), k.double(), v.double(), backend="torch", **kw)
    assert rel_err(got, want) <= TOL[torch.float32]
    assert rel_err(got_state.S, want_state.S) <= TOL[torch.float32]
    assert got_state.offset.tolist() == want_state.offset.tolist() == [11, 7 + T]


def test_streaming_in_pieces_equals_whole():
    """Prefill in chunks, then decode token by token (the step kernel), equals one pass (SPEC §7)."""
    q, k, v = inputs(1, 2, 23, 16, 16, torch.bfloat16)
    kw = dict(decay="retnet", normalize_decay=True, normalize_retention=True)
    whole, _ = retention(q.double(), k.double(), v.double(), backend="torch", **kw)
    state, outs = None, []
    for start, end, mode in ((0, 13, "chunkwise"), (13, 20, "chunkwise"), (20, 21, "recurrent"), (21, 23, "recurrent")):
        o, state = retention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], mode=mode, chunk_size=4,
            state=state, output_state=True, backend="triton", **kw,
        )  # fmt: skip
        outs.append(o)
    assert rel_err(torch.cat(outs, dim=2), whole) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype,Dk,Dv", [(torch.float32, 256, 512), (torch.bfloat16, 24, 40)])
def test_recurrent_step_in_place(dtype, Dk, Dv):
    """The fused decode step, normalizations included, updates the state in place like the reference form."""
    B, H, T = 2, 2, 3
    q, k, v = inputs(B, H, T, Dk, Dv, dtype, seed=1)
    log_g = log_gamma("retnet", H).to(DEVICE)
    kw = dict(normalize_decay=True, normalize_retention=True)
    state = RetentionState.zeros(B, H, Dk, Dv, offset=torch.tensor([-1, 5]), device=DEVICE)  # row 0: left padding
    want_state = RetentionState(state.S.double(), state.z.double(), state.offset.clone())
    S_storage = state.S.data_ptr()
    for t in range(T):
        o = decode_step_(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], log_g, state, **kw)
        x = (y[:, :, t : t + 1].double() for y in (q, k, v))
        want, want_state = retention(*x, mode="recurrent", state=want_state, output_state=True, backend="torch", **kw)
        assert rel_err(o, want) <= TOL[dtype]
    assert state.S.data_ptr() == S_storage
    assert rel_err(state.S, want_state.S) <= TOL[torch.float32]
    assert rel_err(state.z, want_state.z) <= TOL[torch.float32]
    assert torch.equal(state.offset, want_state.offset.to(DEVICE))


@pytest.mark.parametrize("normalize", [False, True])
def test_decode_token_through_retention(normalize):
    """One token in the recurrent form takes the fused step; the given state is left untouched."""
    q, k, v = inputs(2, 3, 1, 16, 24, torch.bfloat16, seed=3)
    state = RetentionState.zeros(2, 3, 16, 24, offset=torch.tensor([-2, 40]), device=DEVICE)
    state.S.normal_(), state.z.normal_()
    before = RetentionState(state.S.clone(), state.z.clone(), state.offset.clone())
    kw = dict(mode="recurrent", output_state=True, normalize_decay=normalize, normalize_retention=normalize)
    with torch.no_grad():
        got, got_state = retention(q, k, v, state=state, backend="triton", **kw)
    state64 = RetentionState(state.S.double(), state.z.double(), state.offset)
    want, want_state = retention(q.double(), k.double(), v.double(), state=state64, backend="torch", **kw)
    assert got.dtype == v.dtype and rel_err(got, want) <= TOL[torch.bfloat16]
    assert rel_err(got_state.S, want_state.S) <= TOL[torch.bfloat16]
    assert rel_err(got_state.z, want_state.z) <= TOL[torch.bfloat16]
    assert torch.equal(got_state.offset, want_state.offset)
    for now, then in ((state.S, before.S), (state.z, before.z), (state.offset, before.offset)):
        assert torch.equal(now, then)


@pytest.mark.parametrize("contiguous", [True, False])
def test_decode_step_overwrite(contiguous):
    """``overwrite=True``: the kernel writes the new S over a contiguous float32 S and copies the new z over z,
    with the same output and state as a step into new tensors; a strided state gets new tensors, left as it was."""
    q, k, v = inputs(2, 3, 1, 16, 24, torch.bfloat16, seed=4)
    state = RetentionState.zeros(2, 3, 16, 24, offset=torch.tensor([7, 0]), device=DEVICE)
    state.S.normal_(), state.z.normal_()
    kw = dict(decay="retnet", scale=0.25, normalize_decay=True, normalize_retention=True, backend="triton")
    with torch.no_grad():
        want, want_state = decode_step(q, k, v, state=state, **kw)
        if contiguous:
            given = RetentionState(state.S.clone(), state.z.clone(), state.offset.clone())
        else:  # every other element of a wider buffer
            S, z = (torch.stack((t, torch.full_like(t, torch.nan)), -1)[..., 0] for t in (state.S, state.z))
            given = RetentionState(S, z, state.offset.clone())
        got, got_state = decode_step(q, k, v, state=given, overwrite=True, **kw)
    assert torch.equal(got, want)
    for name in ("S", "z", "offset"):
        assert torch.equal(getattr(got_state, name), getattr(want_state, name))
    assert (got_state.S is given.S and got_state.z is given.z) == contiguous
    assert torch.equal(given.S, (want_state if contiguous else state).S)
    assert torch.equal(given.z, (want_state if contiguous else state).z)
    assert torch.equal(given.offset, state.offset)


def test_gradients_through_retention():
    q, k, v = (x.requires_grad_() for x in inputs(1, 2, 21, 8, 8, torch.float32, seed=2))
    kw = dict(mode="chunkwise", chunk_size=8, normalize_decay=True, normalize_retention=True)
    w = torch.randn(1, 2, 21, 8, device=DEVICE)
    (retention(q, k, v, backend="triton", **kw)[0] * w).sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    (retention(qd, kd, vd, backend="torch", **kw)[0] * w.double()).sum().backward()
    for a, b in ((q, qd), (k, kd), (v, vd)):
        assert rel_err(a.grad, b.grad) <= TOL[torch.float32]


def test_dispatch():
    cpu = torch.zeros(1, 1, 1, 4)
    assert retention_module._forms("auto", cpu) is retention_module.torch_backend
    assert retention_module._forms("torch", cpu) is retention_module.torch_backend
    with pytest.raises(ValueError, match="backend"):
        retention(cpu, cpu, cpu, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        retention(x, x, x, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        retention(x.double(), x.double(), x.double(), backend="triton")
