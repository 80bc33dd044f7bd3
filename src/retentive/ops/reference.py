"""Retention in plain PyTorch, as the definitions read: the oracle the tests hold every backend to.

``naive`` builds the whole T x T matrix straight from the definition (normalizations included) and is the
independent truth the tests use in float64. ``chunkwise`` is the chunkwise form (docs/math.md, Retention, one
head) with autograd through every step: the truth for the backward passes of the backends. It returns the
unnormalized :class:`~retentive.ops.backend.Pieces` (see :class:`~retentive.ops.backend.RetentionBackend`).
Nothing here runs outside the tests: the production forms are :mod:`.torch_backend` and :mod:`.triton`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import Pieces, chunkwise_from
from .decay import chunk_decay, decay_powers, split_documents


def naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    *,
    causal: bool = True,
    normalize_decay: bool = False,
    normalize_retention: bool = False,
    starts: Tensor | None = None,
) -> Tensor:
    """O = (Q K^T ⊙ D̃) V / max(|row sum|, 1), by definition, with no state. ``starts`` (B, T) bool marks the first
    token of each packed document: D̃ is 0 between tokens of different documents. Returns (B, H, T, Dv)."""
    T = q.shape[-2]
    idx = torch.arange(T, device=q.device, dtype=q.dtype)
    delta = idx[:, None] - idx[None, :]
    D = decay_powers(log_g, delta.abs())  # (H, T, T)
    if causal:
        D = D * (delta >= 0)
    if starts is not None:
        doc = starts.cumsum(-1)  # (B, T): the document of each token
        D = D * (doc[:, None, :, None] == doc[:, None, None, :])  # (B, H, T, T)
    if normalize_decay:
        D = D / D.sum(-1, keepdim=True).sqrt()
    R = (q @ k.transpose(-1, -2)) * D  # (B, H, T, T)
    if normalize_retention:
        R = R / R.sum(-1, keepdim=True).abs().clamp(min=1)
    return R @ v


def scan_chunks(kv: Tensor, ks: Tensor, g_chunk: Tensor, S: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The state entering each chunk: S_(n+1) = g_n S_n + kv_n, z_(n+1) = g_n z_n + ks_n, g_n = gamma^C or 0.

    Args: kv (B, H, N, Dk, Dv), ks (B, H, N, Dk): what each chunk adds; g_chunk: the decay across each chunk,
        broadcastable to (B, H, N); S (B, H, Dk, Dv), z (B, H, Dk): the start.
    Returns: S_in (B, H, N, Dk, Dv), z_in (B, H, N, Dk), and the state after the last chunk.
    """
    S_in, z_in = [], []
    g = g_chunk.expand(kv.shape[:3]).unbind(2)  # N of (B, H)
    for kv_i, ks_i, g_i in zip(kv.unbind(2), ks.unbind(2), g, strict=True):  # unbind: one backward, not N
        S_in.append(S)
        z_in.append(z)
        S = torch.addcmul(kv_i, g_i[..., None, None], S)  # (B, H, Dk, Dv)
        z = torch.addcmul(ks_i, g_i[..., None], z)
    return torch.stack(S_in, dim=2), torch.stack(z_in, dim=2), S, z


def chunk_pieces(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    S: Tensor | None,
    z: Tensor | None,
    with_rowsum: bool,
    scale: float = 1.0,
    starts: Tensor | None = None,
) -> Pieces:
    """Chunkwise recurrent form over N equal chunks at once (the mamba ``ssd_minimal`` way).

    Args:
        q, k: (B, H, N, C, Dk); v: (B, H, N, C, Dv): N chunks of C tokens.
        log_g: (H,); S: (B, H, Dk, Dv) and z: (B, H, Dk) the state before the first chunk, or None.
        scale: multiplies every q . k.
        starts: (B, N, C) bool, True on the first token of each packed document, or None.
    Returns:
        Pieces with o: (B, H, N, C, Dv), r: (B, H, N, C).
    """
    B, H, _, C, Dk = q.shape
    decay = chunk_decay(log_g, C, scale)
    if starts is not None:
        decay = split_documents(decay, starts)

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


chunkwise = chunkwise_from(chunk_pieces)  # with autograd through every step: the truth for the backward passes
