"""Packed documents, ``retention(..., starts=...)``: each document reads nothing from before its start.

Two truths, both in float64: ``naive(..., starts=...)`` (the whole T x T matrix, zero across documents), and
``alone`` below, which cuts every row at its starts and runs each document as a row of its own, the only way to
get the same numbers without ``starts``. With a carried state, the truth is the recurrence written out token by
token (``recurrence``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retentive.ops import RetentionState, log_gamma, retention
from retentive.ops.reference import naive

F64 = torch.float64
NORMS = list(itertools.product([False, True], repeat=2))  # (normalize_decay, normalize_retention)
FORMS = [("parallel", 64), ("chunkwise", 1), ("chunkwise", 4), ("chunkwise", 7), ("recurrent", 1)]
TIGHT = {"rtol": 1e-10, "atol": 1e-10}  # float64 against float64: only rounding differs


def inputs(B: int, H: int, T: int, dk: int = 8, dv: int = 6, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, d, generator=g, dtype=F64).requires_grad_(requires_grad) for d in (dk, dk, dv))


def random_starts(B: int, T: int, seed: int, p: float = 0.2) -> torch.Tensor:
    """(B, T) bool: documents of random lengths, one of length 1 and one starting at a chunk boundary included."""
    starts = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < p
    starts[:, 0] = True
    if T > 5:
        starts[0, 4:6] = True  # a one-token document at 4
    return starts


def alone(q, k, v, starts, **norms):
    """Every document of every row run by retention() as a row of its own, the outputs put back in place."""
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=v.dtype)
    for b in range(q.shape[0]):
        edges = [*starts[b].nonzero().flatten().tolist(), q.shape[2]]
        for s, e in itertools.pairwise(edges):
            piece = (x[b : b + 1, :, s:e] for x in (q, k, v))
            out[b : b + 1, :, s:e] = retention(*piece, mode="parallel", **norms)[0]
    return out


def recurrence(q, k, v, starts, S, z, offset, *, normalize_decay: bool, normalize_retention: bool):
    """The recurrent form by its definition, token by token: the state is dropped at each start, and each token's
    position (for the decay normalization) counts from its document's start, or from ``offset`` before the first.
    Returns o (B, H, T, Dv), S, z after the last token and the next positions (B,)."""
    _, H, T, dk = q.shape
    gamma = log_gamma("retnet", H).exp().to(F64)[None, :, None]  # (1, H, 1)
    positions = offset.clone()
    outs = []
    for t in range(T):
        keep = (~starts[:, t]).to(F64)[:, None, None]  # (B, 1, 1)
        positions = torch.where(starts[:, t], 0, positions)
        S = (gamma * keep)[..., None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = gamma * keep * z + k[:, :, t]
        q_t = q[:, :, t] * dk**-0.5
        o = (q_t[:, :, None] @ S).squeeze(2)  # (B, H, Dv)
        r = (q_t * z).sum(-1)  # (B, H)
        if normalize_decay:
            c = (1 - gamma[..., 0] ** (positions[:, None] + 1)) / (1 - gamma[..., 0])  # (B, H)
            o, r = o / c.sqrt()[..., None], r / c.sqrt()
        if normalize_retention:
            o = o / r.abs().clamp(min=1)[..., None]
        outs.append(o)
        positions = positions + 1
    return torch.stack(outs, 2), S, z, positions


@pytest.mark.parametrize("normalize_decay,normalize_retention", NORMS)
@pytest.mark.parametrize("mode,chunk_size", FORMS)
def test_every_document_reads_as_if_alone(mode, chunk_size, normalize_decay, normalize_retention):
    """Outputs and every input's gradient equal those of each document run as a row of its own, and naive()."""
    norms = {"normalize_decay": normalize_decay, "normalize_retention": normalize_retention}
    q, k, v = inputs(3, 2, 19, requires_grad=True)
    starts = random_starts(3, 19, seed=1)
    o, _ = retention(q, k, v, mode=mode, chunk_size=chunk_size, starts=starts, **norms)
    want = alone(q, k, v, starts, **norms)
    lg = log_gamma("retnet", 2).to(F64)
    torch.testing.assert_close(o, want, **TIGHT)
    torch.testing.assert_close(o, naive(q * 8**-0.5, k, v, lg, starts=starts, **norms), **TIGHT)

    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), grad)
    for g, w in zip(got, torch.autograd.grad(want, (q, k, v), grad), strict=True):
        torch.testing.assert_close(g, w, **TIGHT)


@pytest.mark.parametrize("normalize_decay,normalize_retention", NORMS)
@pytest.mark.parametrize("mode,chunk_size", FORMS)
def test_a_carried_state_reaches_only_the_tokens_before_the_first_start(
    mode, chunk_size, normalize_decay, normalize_retention
):
    """With a state passed in: the recurrence by definition, the state and offset after the last token, and the
    gradients of q, k, v and of the state (which the rows' later documents must not receive)."""
    norms = {"normalize_decay": normalize_decay, "normalize_retention": normalize_retention}
    B, H, T, dk, dv = 3, 2, 17, 8, 6
    q, k, v = inputs(B, H, T, dk, dv, seed=2, requires_grad=True)
    starts = random_starts(B, T, seed=3)
    starts[1:, 0] = False  # rows 1 and 2 continue the state's document; row 0 drops it at once
    starts[2] = False  # row 2: no start at all
    S0 = torch.randn(B, H, dk, dv, dtype=F64, requires_grad=True)
    z0 = torch.randn(B, H, dk, dtype=F64).abs().requires_grad_(True)
    offset = torch.tensor([5, 0, 30])
    state = RetentionState(S0, z0, offset)
    kw = dict(mode=mode, chunk_size=chunk_size, state=state, starts=starts, output_state=True)
    o, new = retention(q, k, v, **kw, **norms)
    want_o, want_S, want_z, want_offset = recurrence(q, k, v, starts, S0, z0, offset, **norms)
    torch.testing.assert_close(o, want_o, **TIGHT)
    torch.testing.assert_close(new.S, want_S, **TIGHT)
    torch.testing.assert_close(new.z, want_z, **TIGHT)
    assert new.offset.tolist() == want_offset.tolist()

    grads = [torch.randn_like(t) for t in (o, new.S, new.z)]
    wrt = (q, k, v, S0, z0)
    got = torch.autograd.grad((o, new.S, new.z), wrt, grads)
    want = torch.autograd.grad((want_o, want_S, want_z), wrt, grads)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TIGHT)
    assert got[3][0].abs().max() == 0  # row 0 starts a document at its first token: its state reaches nothing


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(2, 40),
    chunk_size=st.integers(1, 12),
    p=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    norms=st.sampled_from(NORMS),
    seed=st.integers(0, 2**16),
)
def test_property_any_starts_any_chunking(T, chunk_size, p, norms, seed):
    """Over lengths, chunk sizes and densities of starts (none, some, every token): the chunkwise form against
    naive(), and streamed in two pieces with the state carried against the whole."""
    nd, nr = norms
    q, k, v = inputs(2, 3, T, seed=seed)
    starts = torch.rand(2, T, generator=torch.Generator().manual_seed(seed)) < p
    kw = {"normalize_decay": nd, "normalize_retention": nr}
    o, state = retention(q, k, v, mode="chunkwise", chunk_size=chunk_size, starts=starts, output_state=True, **kw)
    lg = log_gamma("retnet", 3).to(F64)
    torch.testing.assert_close(o, naive(q * 8**-0.5, k, v, lg, starts=starts, **kw), **TIGHT)

    cut = T // 2
    first, mid = retention(*(x[:, :, :cut] for x in (q, k, v)), starts=starts[:, :cut], output_state=True, **kw)
    rest = (x[:, :, cut:] for x in (q, k, v))
    second, end = retention(*rest, mode="recurrent", state=mid, starts=starts[:, cut:], output_state=True, **kw)
    torch.testing.assert_close(torch.cat([first, second], 2), o, **TIGHT)
    torch.testing.assert_close(end.S, state.S, **TIGHT)
    assert end.offset.tolist() == state.offset.tolist()


def test_no_start_is_one_document():
    """starts all False, or True only at the first token without a state: the same as no starts at all."""
    q, k, v = inputs(2, 2, 12, seed=4)
    plain, _ = retention(q, k, v, mode="chunkwise", chunk_size=5)
    for first in (False, True):
        starts = torch.zeros(2, 12, dtype=torch.bool)
        starts[:, 0] = first
        got, _ = retention(q, k, v, mode="chunkwise", chunk_size=5, starts=starts)
        torch.testing.assert_close(got, plain, **TIGHT)


def test_bad_starts_are_refused_naming_the_argument():
    q, k, v = inputs(2, 2, 6)
    bad = [
        (torch.zeros(2, 5, dtype=torch.bool), "starts must be a \\(batch, length\\) = \\(2, 6\\) bool tensor"),
        (torch.zeros(2, 6, dtype=torch.long), "starts must be a .* bool tensor, got torch.int64"),
        ([[True] * 6] * 2, "starts must be a .* bool tensor, got list"),
    ]
    for starts, message in bad:
        with pytest.raises(ValueError, match=message):
            retention(q, k, v, starts=starts)
    with pytest.raises(ValueError, match="starts \\(packed documents\\) needs causal retention"):
        retention(q, k, v, causal=False, starts=torch.zeros(2, 6, dtype=torch.bool))
