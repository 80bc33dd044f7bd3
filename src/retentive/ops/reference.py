"""Retention in plain PyTorch: the spec in code (SPEC §1-2).

Every form returns the *unnormalized* pieces, so that the normalizations of SPEC §2 are applied
once, identically, by :func:`retentive.ops.retention`:

    o_n = sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m      (numerator, (B, H, T, Dv))
    r_n = sum_{m<=n} gamma^(n-m) (q_n . k_m)          (row sum, (B, H, T), = q_n . z_n)

plus the final state (S, z). q is expected already scaled and rotated. All inputs share one dtype,
float32 or float64 (the public function upcasts half precision), so state and sums accumulate there.

``naive`` builds the whole T x T matrix straight from the definition (normalizations included) and is
the independent truth the tests use in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .decay import causal_decay_matrix, decay_powers, decay_sum
from .state import RetentionState


class Pieces(NamedTuple):
    o: Tensor  # (B, H, T, Dv) unnormalized output
    r: Tensor | None  # (B, H, T) row sums q_n . z_n, when asked for
    S: Tensor  # (B, H, Dk, Dv) final state
    z: Tensor  # (B, H, Dk) final key sum


def naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    *,
    causal: bool = True,
    normalize_decay: bool = False,
    normalize_retention: bool = False,
) -> Tensor:
    """O = (Q K^T ⊙ D̃) V / max(|row sum|, 1), by definition, with no state. Returns (B, H, T, Dv)."""
    T = q.shape[-2]
    idx = torch.arange(T, device=q.device, dtype=q.dtype)
    delta = idx[:, None] - idx[None, :]
    D = decay_powers(log_g, delta.abs())  # (H, T, T)
    if causal:
        D = D * (delta >= 0)
    if normalize_decay:
        D = D / D.sum(-1, keepdim=True).sqrt()
    R = (q @ k.transpose(-1, -2)) * D  # (B, H, T, T)
    if normalize_retention:
        R = R / R.sum(-1, keepdim=True).abs().clamp(min=1)
    return R @ v


class ChunkDecay(NamedTuple):
    """The decay factors of one chunk of C tokens, per head."""

    D: Tensor  # (H, 1, C, C) scale gamma^(j-l) for j >= l, else 0: inside the chunk
    g_in: Tensor  # (H, 1, C, 1) scale gamma^(j+1): the incoming state -> token j
    g_out: Tensor  # (H, 1, C, 1) gamma^(C-1-l): token l -> the end of the chunk
    g_chunk: Tensor  # (H, 1) gamma^C: across one chunk


def chunk_decay(log_g: Tensor, C: int, scale: float = 1.0) -> ChunkDecay:
    """The factors :func:`chunk_pieces` (and the hand-written backward of :mod:`.chunk`) multiply by.

    The two that multiply q, D and g_in, carry the score scale: it costs nothing there, where scaling q would
    cost a pass over q (and a copy of it kept for the backward pass).
    """
    j = torch.arange(C, device=log_g.device, dtype=log_g.dtype)
    return ChunkDecay(
        causal_decay_matrix(log_g, C)[:, None] * scale,
        decay_powers(log_g, j + 1)[:, None, :, None] * scale,
        decay_powers(log_g, C - 1 - j)[:, None, :, None],
        torch.exp(log_g * C)[:, None],
    )


def scan_chunks(kv: Tensor, ks: Tensor, g_chunk: Tensor, S: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The state entering each chunk: S_(n+1) = gamma^C S_n + kv_n, z_(n+1) = gamma^C z_n + ks_n.

    Args: kv (B, H, N, Dk, Dv), ks (B, H, N, Dk): what each chunk adds; S (B, H, Dk, Dv), z (B, H, Dk): the start.
    Returns: S_in (B, H, N, Dk, Dv), z_in (B, H, N, Dk), and the state after the last chunk.
    """
    S_in, z_in = [], []
    for kv_i, ks_i in zip(kv.unbind(2), ks.unbind(2), strict=True):  # unbind, not kv[:, :, i]: one backward, not N
        S_in.append(S)
        z_in.append(z)
        S = torch.addcmul(kv_i, g_chunk[..., None], S)  # (B, H, Dk, Dv)
        z = torch.addcmul(ks_i, g_chunk, z)
    return torch.stack(S_in, dim=2), torch.stack(z_in, dim=2), S, z


def chunk_pieces(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    S: Tensor | None,
    z: Tensor | None,
    *,
    with_rowsum: bool,
    scale: float = 1.0,
) -> Pieces:
    """Chunkwise recurrent form over N equal chunks at once (SPEC §1, the mamba ``ssd_minimal`` way).

    Args:
        q, k: (B, H, N, C, Dk); v: (B, H, N, C, Dv): N chunks of C tokens.
        log_g: (H,); S: (B, H, Dk, Dv) and z: (B, H, Dk) the state before the first chunk, or None.
        scale: multiplies every q . k.
    Returns:
        Pieces with o: (B, H, N, C, Dv), r: (B, H, N, C).
    """
    B, H, _, C, Dk = q.shape
    decay = chunk_decay(log_g, C, scale)

    # 1. inside each chunk: the parallel form
    A = (q @ k.transpose(-1, -2)) * decay.D  # (B, H, N, C, C)
    o = A @ v  # (B, H, N, C, Dv)
    r = A.sum(-1) if with_rowsum else None  # (B, H, N, C)

    # 2. what each chunk adds to the state, decayed to its end
    k_out = k * decay.g_out  # (B, H, N, C, Dk)
    kv = k_out.transpose(-1, -2) @ v  # (B, H, N, Dk, Dv)
    ks = k_out.sum(-2)  # (B, H, N, Dk)

    # 3. the state entering each chunk: a short scan over chunks
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if S is None else S
    z = q.new_zeros(B, H, Dk) if z is None else z
    S_in, z_in, S, z = scan_chunks(kv, ks, decay.g_chunk, S, z)

    # 4. across chunks: what the state brings to each token
    q_in = q * decay.g_in  # (B, H, N, C, Dk)
    o = o + q_in @ S_in
    if with_rowsum:
        r = r + (q_in @ z_in[..., None]).squeeze(-1)
    return Pieces(o, r, S, z)


def chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    S: Tensor | None,
    z: Tensor | None,
    *,
    chunk_size: int,
    with_rowsum: bool,
    scale: float = 1.0,
    pieces: Callable[..., Pieces] = chunk_pieces,
) -> Pieces:
    """Chunks of ``chunk_size`` tokens; the last one is shorter when chunk_size does not divide T.

    The parallel form is the case chunk_size >= T: one chunk, with the carried state as cross term.
    Args: q, k (B, H, T, Dk); v (B, H, T, Dv); ``scale`` multiplies q . k; ``pieces`` computes a run of equal
    chunks (:func:`chunk_pieces`, or its twin with a hand-written backward in :mod:`.chunk`).
    Returns Pieces with o (B, H, T, Dv), r (B, H, T).
    """
    T = q.shape[-2]
    C = min(chunk_size, T)
    full = T - T % C
    outs = []
    for start, end, n in ((0, full, full // C), (full, T, 1)):  # the full chunks, then the short one
        if end == start:
            continue
        q_, k_, v_ = (x[:, :, start:end].unflatten(2, (n, -1)) for x in (q, k, v))  # (B, H, n, C', D)
        p = pieces(q_, k_, v_, log_g, S, z, with_rowsum=with_rowsum, scale=scale)
        S, z = p.S, p.z
        outs.append(p)
    o = _concat_time([p.o.flatten(2, 3) for p in outs])
    r = _concat_time([p.r.flatten(2, 3) for p in outs]) if with_rowsum else None
    return Pieces(o, r, S, z)


def _concat_time(pieces: list[Tensor]) -> Tensor:
    """Concatenate along time (dim 2), without a copy when there is one piece (the parallel form)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    S: Tensor | None,
    z: Tensor | None,
    *,
    with_rowsum: bool,
    scale: float = 1.0,
) -> Pieces:
    """One token at a time: S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n; z_n = gamma z_{n-1} + k_n.

    Args: q, k (B, H, T, Dk); v (B, H, T, Dv); ``scale`` multiplies q . k.
    Returns Pieces with o (B, H, T, Dv), r (B, H, T).
    """
    q = q * scale
    B, H, _, Dk = q.shape
    gamma = log_g.exp()[:, None]  # (H, 1)
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if S is None else S
    z = q.new_zeros(B, H, Dk) if z is None else z
    outs, rows = [], []
    for q_t, k_t, v_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), strict=True):  # unbind: one backward, not T
        S = gamma[..., None] * S + k_t[..., :, None] * v_t[..., None, :]  # (B, H, Dk, Dv)
        z = gamma * z + k_t
        outs.append((q_t[..., None, :] @ S).squeeze(-2))  # (B, H, Dv)
        if with_rowsum:
            rows.append((q_t * z).sum(-1))  # (B, H)
    o = torch.stack(outs, dim=2)
    r = torch.stack(rows, dim=2) if with_rowsum else None
    return Pieces(o, r, S, z)


def decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    state: RetentionState | None,
    *,
    scale: float,
    normalize_decay: bool,
    normalize_retention: bool,
    output_state: bool,
) -> tuple[Tensor, RetentionState | None]:
    """One token of every head, without gradients: the recurrent form unrolled once, normalizations included.

    What decoding runs per token, so it takes as few tensor ops as the math allows; the given state is left as
    it is. Args: q, k (B, H, 1, Dk) unscaled, v (B, H, 1, Dv); log_g (H,) in the state's dtype.
    Returns o (B, H, 1, Dv) in v's dtype and the new state (or None).
    """
    out_dtype, dtype = v.dtype, log_g.dtype
    if q.dtype != dtype:  # half precision: the state and the sums stay in float32 (no-op casts cost ~2 us each)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kv = k.transpose(-1, -2) * v  # (B, H, Dk, Dv): k_n^T v_n
    if state is None:
        S, z, offset = kv, k[:, :, 0], torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    else:
        S, z, offset = state.S, state.z, state.offset
        if S.dtype != dtype:
            S, z = S.to(dtype), z.to(dtype)
        gamma = log_g.exp()[:, None]  # (H, 1)
        S = torch.addcmul(kv, gamma[..., None], S)  # gamma S + k^T v
        z = torch.addcmul(k[:, :, 0], gamma, z)  # (B, H, Dk)
    o = (q @ S) * scale  # (B, H, 1, Dv)
    if normalize_decay or normalize_retention:
        r = (q[:, :, 0] * z).sum(-1)[..., None, None] * scale if normalize_retention else None  # (B, H, 1, 1)
        if normalize_decay:
            c_sqrt = decay_sum(log_g, offset[:, None]).sqrt()[..., None]  # (B, H, 1, 1)
            o = o / c_sqrt
            r = r / c_sqrt if normalize_retention else None
        if normalize_retention:
            o = o / r.abs().clamp(min=1)
    new_state = RetentionState(S, z, offset + 1) if output_state else None
    return (o if o.dtype == out_dtype else o.to(out_dtype)), new_state
