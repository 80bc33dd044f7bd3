"""The hand-written chunkwise backward (ops/torch_backend.py) against autograd through the reference forms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retentive.ops import RetentionState, log_gamma, reference, retention, torch_backend

F64 = torch.float64


def run(module, inputs: dict, *, chunk_size: int, with_rowsum: bool, scale: float):
    """Forward with ``module``'s chunkwise, then the gradients of a loss that uses o, r, S and z."""
    q, k, v, S, z = (inputs[n] for n in "qkvSz")
    lg = log_gamma("retnet", q.shape[1]).to(q.dtype)
    p = module.chunkwise(q, k, v, lg, S, z, chunk_size=chunk_size, with_rowsum=with_rowsum, scale=scale)
    weights = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=weights, dtype=F64).to(t.dtype)).sum() for t in (p.o, p.S, p.z))
    if with_rowsum:
        loss = loss + (p.r * torch.randn(p.r.shape, generator=weights, dtype=F64).to(p.r.dtype)).sum()
    leaves = [t for t in inputs.values() if t is not None]
    return [p.o, p.S, p.z, *([p.r] if with_rowsum else []), *torch.autograd.grad(loss, leaves)]


def make(B: int, H: int, T: int, dk: int, dv: int, with_state: bool, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (B, H, T, dk), "k": (B, H, T, dk), "v": (B, H, T, dv), "S": (B, H, dk, dv), "z": (B, H, dk)}
    return {
        name: None
        if name in "Sz" and not with_state
        else torch.randn(shape, generator=g, dtype=F64).to(dtype).requires_grad_()
        for name, shape in shapes.items()
    }


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    T=st.integers(1, 70),
    dk=st.sampled_from([1, 3, 8]),
    dv=st.sampled_from([1, 5, 8]),
    chunk_size=st.integers(1, 80),
    with_rowsum=st.booleans(),
    with_state=st.booleans(),
)
def test_backward_matches_autograd_float64(B, H, T, dk, dv, chunk_size, with_rowsum, with_state):
    inputs = make(B, H, T, dk, dv, with_state, F64)
    kw = dict(chunk_size=chunk_size, with_rowsum=with_rowsum, scale=dk**-0.5)
    for got, want in zip(run(torch_backend, inputs, **kw), run(reference, inputs, **kw), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 16, 64, 256])
def test_backward_float32_close_to_float64(chunk_size):
    """float32 gradients within 1e-5 (relative to the largest) of the float64 ones, 300 tokens."""
    want = run(reference, make(1, 4, 300, 16, 32, True, F64), chunk_size=chunk_size, with_rowsum=True, scale=0.25)
    got = run(
        torch_backend, make(1, 4, 300, 16, 32, True, torch.float32), chunk_size=chunk_size, with_rowsum=True, scale=0.25
    )
    for g, w in zip(got, want, strict=True):
        assert ((g.to(F64) - w).abs().max() / w.abs().max()).item() < 1e-5


def test_keeps_only_inputs_and_chunk_states():
    """What the backward pass holds: q, k, v (the caller's tensors, no copies) and small per-chunk states."""
    inputs = make(1, 2, 512, 8, 16, False, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch_backend.chunkwise(
            *(inputs[n] for n in "qkv"), log_gamma("retnet", 2).float(), None, None, chunk_size=64, with_rowsum=True
        )
    inputs_ptr = {inputs[n].untyped_storage().data_ptr() for n in "qkv"}
    assert inputs_ptr <= {t.untyped_storage().data_ptr() for t in saved}
    extra = sum(t.numel() for t in saved if t.untyped_storage().data_ptr() not in inputs_ptr)
    assert extra <= 8 * 2 * 8 * 17 + 2  # S_in and z_in: (1, 2, 8, 8, 16) and (1, 2, 8, 8), and log gamma


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 9), H=st.integers(1, 3), reverse=st.booleans())
def test_scan_states_is_the_reference_scan_both_ways(N, H, reverse):
    """The in-place scan of the fast path against reference.scan_chunks (reverse: on the flipped chunks)."""
    g = torch.Generator().manual_seed(N * 7 + H)
    kv, ks = torch.randn(2, H, N, 3, 4, generator=g, dtype=F64), torch.randn(2, H, N, 3, generator=g, dtype=F64)
    S, z = torch.randn(2, H, 3, 4, generator=g, dtype=F64), torch.randn(2, H, 3, generator=g, dtype=F64)
    flip = (lambda x: x.flip(2)) if reverse else (lambda x: x)
    per_head = torch.rand(H, 1, generator=g, dtype=F64)  # gamma^C
    per_chunk = torch.rand(2, H, N, generator=g, dtype=F64) * (torch.rand(2, 1, N, generator=g) < 0.7)  # documents
    for g_chunk in (per_head, per_chunk):
        in_order = flip(g_chunk) if g_chunk.dim() == 3 else g_chunk
        S_in, z_in, S_end, z_end = reference.scan_chunks(flip(kv), flip(ks), in_order, S, z)
        for got, want in (
            (torch_backend.scan_states(kv, S, g_chunk, reverse=reverse), (flip(S_in), S_end)),
            (torch_backend.scan_states(ks, z, g_chunk, reverse=reverse), (flip(z_in), z_end)),
        ):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_output_alone_skips_the_key_sum_and_agrees():
    """A loss on o alone (training: no row sums, no state out) gives no gradient through z: the backward skips
    its scan, and every other gradient still equals autograd through the reference."""
    inputs = make(2, 3, 50, 8, 5, True, F64)
    grads = []
    for module in (torch_backend, reference):
        q, k, v, S, z = (inputs[n] for n in "qkvSz")
        lg = log_gamma("retnet", 3).to(F64)
        o = module.chunkwise(q, k, v, lg, S, z, chunk_size=16, with_rowsum=False, scale=0.3).o
        got = torch.autograd.grad((o * o).sum(), [q, k, v, S, z], allow_unused=True, materialize_grads=True)
        grads.append(got)
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not grads[0][-1].any()


# a backward run under autocast too: the hand-written one ignores it, the recurrent form's (autograd's) follows it
@pytest.mark.parametrize(
    "mode,backward_under_autocast",
    [("parallel", False), ("chunkwise", False), ("recurrent", False), ("parallel", True), ("chunkwise", True)],
)
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_autocast_changes_nothing(mode, backward_under_autocast, causal):
    """Under CPU autocast bf16, retention (forward, state, gradients) equals the same call on the bf16 inputs
    without autocast: the backend computes in float32 whatever autocast says."""
    inputs = make(2, 2, 21, 8, 6, False, torch.bfloat16)
    state = RetentionState(  # a stream carried on, so that the state's gradients flow too
        *(torch.randn(shape, generator=torch.Generator().manual_seed(1)) for shape in ((2, 2, 8, 6), (2, 2, 8))),
        torch.tensor([3, 5]),
    )
    weight = torch.randn(2, 2, 21, 6, generator=torch.Generator().manual_seed(2))

    def run(autocast: bool) -> list[torch.Tensor]:
        q, k, v = (inputs[n].detach().requires_grad_() for n in "qkv")
        S, z = (t.detach().requires_grad_() for t in (state.S, state.z))
        carried = RetentionState(S, z, state.offset) if causal else None
        leaves = [q, k, v, *((S, z) if causal else ())]
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            o, new = retention(
                q, k, v, mode=mode, chunk_size=8, state=carried, causal=causal, normalize_decay=True,
                normalize_retention=True, output_state=causal, backend="torch",
            )  # fmt: skip
            if backward_under_autocast:
                grads = torch.autograd.grad((o * weight).sum(), leaves)
        if not backward_under_autocast:
            grads = torch.autograd.grad((o * weight).sum(), leaves)
        return [o, *((new.S, new.z) if causal else ()), *grads]

    for got, want in zip(run(True), run(False), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("with_state", [False, True])
def test_cpu_autocast_changes_nothing_in_a_decode_step(with_state):
    q, k, v = (torch.randn(2, 3, 1, 8, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    state = retention(q, k, v, mode="recurrent", output_state=True)[1] if with_state else None
    results = []
    for autocast in (True, False):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            o, new = retention(q, k, v, mode="recurrent", state=state, normalize_decay=True, output_state=True)
        results.append([o, new.S, new.z])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_forms_run_on_meta_tensors(mode):
    """A model traced for its shapes on the meta device: autocast, which knows no meta device, is not asked."""
    q, k, v = (torch.empty(2, 3, 5, 8, device="meta") for _ in range(3))
    o, state = retention(q, k, v, mode=mode, chunk_size=2, output_state=True)
    assert o.shape == (2, 3, 5, 8) and o.device.type == "meta"
    o, state = retention(q[:, :, :1], k[:, :, :1], v[:, :, :1], mode="recurrent", state=state, output_state=True)
    assert o.shape == (2, 3, 1, 8) and state.S.shape == (2, 3, 8, 8)


def test_compiled_forms_under_autocast_trace_whole():
    """The autocast check traces under ``torch.compile(fullgraph=True)``, with autocast on and off."""
    q, k, v = (torch.randn(1, 2, 1, 4) for _ in range(3))
    step = torch.compile(lambda q, k, v: retention(q, k, v, mode="recurrent", output_state=True), fullgraph=True)
    want = retention(q, k, v, mode="recurrent", output_state=True)
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            o, state = step(q, k, v)
        torch.testing.assert_close(o, want[0])
        torch.testing.assert_close(state.S, want[1].S)
