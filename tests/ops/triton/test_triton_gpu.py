"""Full shapes on a GPU (skipped without one): the kernels against the float64 reference up to 32k tokens."""

import pytest
import torch
from triton_checks import TOL, rel_err

from retentive.ops import RetentionState, retention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="full shapes need a CUDA GPU")


@pytest.mark.parametrize(
    "dtype,T,Dk,Dv",
    [
        (torch.bfloat16, 2048, 64, 128),
        (torch.bfloat16, 32768, 256, 512),
        # float32: 32-wide head-dim tiles, products on the CUDA cores; the head dims of the GPU check's float32
        # chunkwise case, whose compiled kernels this reuses
        (torch.float32, 8192, 128, 256),
    ],
)
def test_long_sequences(dtype, T, Dk, Dv):
    """Output, gradients and the carried state against float64, normalizations on."""
    B, H = 1, 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, device="cuda", generator=gen) for d in (Dk, Dk, Dv))
    state = RetentionState.zeros(B, H, Dk, Dv, offset=100, device="cuda")
    state.S.normal_(generator=gen), state.z.normal_(generator=gen)
    kw = dict(mode="chunkwise", chunk_size=64, normalize_decay=True, normalize_retention=True, output_state=True)
    w = torch.randn(B, H, T, Dv, device="cuda", generator=gen)

    ours = [x.to(dtype, copy=True).requires_grad_() for x in (q, k, v)]  # a copy even in float32
    o, new_state = retention(*ours, state=state, backend="triton", **kw)
    (o.float() * w).sum().backward()
    truth = [x.double().requires_grad_() for x in (q, k, v)]
    state64 = RetentionState(state.S.double(), state.z.double(), state.offset)
    o64, state64 = retention(*truth, state=state64, backend="torch", **kw)
    (o64 * w.double()).sum().backward()

    assert rel_err(o, o64) <= TOL[dtype]
    assert rel_err(new_state.S, state64.S) <= TOL[dtype]
    assert rel_err(new_state.z, state64.z) <= TOL[dtype]
    for a, b in zip(ours, truth, strict=True):
        assert rel_err(a.grad, b.grad) <= TOL[dtype]


@pytest.mark.parametrize("T,chunk_size", [(65536, 64), (4096, 1)])
def test_finite_bf16(T, chunk_size):
    """No inf or NaN at 65,536 tokens, nor with 1-token chunks (SPEC §7)."""
    q, k, v = (torch.randn(1, 4, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o, _ = retention(q, k, v, mode="chunkwise", chunk_size=chunk_size, normalize_decay=True, normalize_retention=True)
    o.float().square().mean().backward()
    for x in (o, q.grad, k.grad, v.grad):
        assert torch.isfinite(x).all()


def test_prefill_then_decode_retnet_heads():
    """retnet-1.3b heads (dk 256, dv 512): a 4k-token chunkwise prefill, then 8 fused decoding steps, equal the
    whole sequence in float64; the decoding step can be captured in a CUDA graph."""
    B, H, T, Dk, Dv, steps = 1, 8, 4096, 256, 512, 8
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, T + steps, d, device="cuda", generator=gen) for d in (Dk, Dk, Dv))
    kw = dict(normalize_decay=True, normalize_retention=True)
    want, _ = retention(q.double(), k.double(), v.double(), mode="chunkwise", backend="torch", **kw)
    x = [t.bfloat16() for t in (q, k, v)]
    with torch.no_grad():
        o, state = retention(*(t[:, :, :T] for t in x), mode="chunkwise", output_state=True, **kw)
        outs = [o]
        for t in range(T, T + steps):
            o, state = retention(
                *(y[:, :, t : t + 1] for y in x), mode="recurrent", state=state, output_state=True, **kw
            )
            outs.append(o)
    assert rel_err(torch.cat(outs, dim=2), want) <= TOL[torch.bfloat16]

    step_inputs = [y[:, :, T : T + 1].clone() for y in x]
    with torch.no_grad():
        retention(*step_inputs, mode="recurrent", state=state, output_state=True, **kw)  # warm-up, compiles
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_graph, _ = retention(*step_inputs, mode="recurrent", state=state, output_state=True, **kw)
        graph.replay()
        o_eager, _ = retention(*step_inputs, mode="recurrent", state=state, output_state=True, **kw)
    torch.testing.assert_close(o_graph, o_eager)
