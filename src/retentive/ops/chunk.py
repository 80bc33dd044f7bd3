"""Chunkwise retention in PyTorch with a hand-written backward: what ``backend="torch"`` trains with.

Autograd through :func:`reference.chunk_pieces` keeps every intermediate of every chunk: the C x C scores,
the decayed keys and queries, ... (about 4x the inputs at C = 256). This autograd function keeps only q, k, v
and the state entering each chunk, and recomputes the scores in the backward pass, which is the forward
pass run backwards (SPEC §1): with A = (Q K^T) ⊙ D inside a chunk and G_n the gradient of the state after
chunk n, scanned from the last chunk to the first (G_(n-1) = gamma^C G_n + (Q_n ⊙ g_in)^T dO_n),

    dA = (dO V^T + dr 1^T) ⊙ D
    dQ = dA K + (dO S_in^T + dr z_in^T) ⊙ g_in
    dK = dA^T Q + (V G_n^T + 1 Gz_n^T) ⊙ g_out
    dV = A^T dO + (K ⊙ g_out) G_n

The forward pass is :func:`reference.chunk_forward` itself; the tests compare the gradients with autograd
through it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference
from .reference import Pieces, chunk_decay, chunk_forward, decode_step, recurrent, scan_chunks

__all__ = ["chunkwise", "decode_step", "recurrent"]


class ChunkRetention(torch.autograd.Function):
    """:func:`reference.chunk_pieces` (N equal chunks) with the backward above."""

    @staticmethod
    def forward(ctx, q, k, v, log_g, S, z, with_rowsum, scale):
        # every product below is batched over (B, H, N): with each head's rows contiguous it runs on views; the
        # projections hand over token-major views, which matmul would copy again at each of the ten products
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, r, S, z, S_in, z_in = chunk_forward(q, k, v, log_g, S, z, with_rowsum=with_rowsum, scale=scale)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, log_g, S_in, z_in)
        return o, r, S, z

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dr, dS, dz):
        q, k, v, log_g, S_in, z_in = ctx.saved_tensors
        do = do.contiguous()  # the gradient arrives token-major too
        decay = chunk_decay(log_g, q.shape[-2], ctx.scale)  # D and g_in carry the scale

        # inside each chunk, one C x C matrix alive at a time: they are the largest tensors here
        A = (q @ k.transpose(-1, -2)).mul_(decay.D)  # (B, H, N, C, C)
        dv = A.transpose(-1, -2) @ do
        del A
        dA = do @ v.transpose(-1, -2)
        if dr is not None:
            dA.add_(dr[..., None])
        dA.mul_(decay.D)
        dq = dA @ k
        dk = dA.transpose(-1, -2) @ q
        del dA

        # across chunks: the gradient of the state after each chunk, scanned backwards
        q_in = q * decay.g_in  # (B, H, N, C, Dk)
        dS_in = q_in.transpose(-1, -2) @ do  # (B, H, N, Dk, Dv): what chunk n's tokens ask of S_in
        dz_in = (q_in * dr[..., None]).sum(-2) if dr is not None else torch.zeros_like(z_in)  # (B, H, N, Dk)
        G = torch.zeros_like(S_in[:, :, 0]) if dS is None else dS
        Gz = torch.zeros_like(z_in[:, :, 0]) if dz is None else dz
        # the forward scan run over the reversed chunks: G_n after chunk n, and the gradient of the first state
        G_out, Gz_out, dS0, dz0 = scan_chunks(dS_in.flip(2), dz_in.flip(2), decay.g_chunk, G, Gz)
        G_out, Gz_out = G_out.flip(2), Gz_out.flip(2)  # (B, H, N, Dk, Dv), (B, H, N, Dk)

        cross_q = do @ S_in.transpose(-1, -2)  # (B, H, N, C, Dk)
        if dr is not None:
            cross_q = cross_q + dr[..., None] * z_in[:, :, :, None]
        dq = torch.addcmul(dq, cross_q, decay.g_in)
        dk = torch.addcmul(dk, v @ G_out.transpose(-1, -2) + Gz_out[:, :, :, None], decay.g_out)
        dv = dv + (k * decay.g_out) @ G_out
        needs = ctx.needs_input_grad
        return dq, dk, dv, None, dS0 if needs[4] else None, dz0 if needs[5] else None, None, None


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
    """:func:`reference.chunk_pieces`, with the hand-written backward."""
    return Pieces(*ChunkRetention.apply(q, k, v, log_g, S, z, with_rowsum, scale))


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
) -> Pieces:
    """:func:`reference.chunkwise` (same arguments, same result), saving only q, k, v and the chunk states."""
    return reference.chunkwise(
        q, k, v, log_g, S, z, chunk_size=chunk_size, with_rowsum=with_rowsum, scale=scale, pieces=chunk_pieces
    )
