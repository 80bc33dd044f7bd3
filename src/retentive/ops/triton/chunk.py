"""The chunkwise form in Triton, forward and backward, with the reference's signature and return.

Forward: a scan over chunks writes the state entering each chunk (``chunk_state``), then every chunk's
output is computed in parallel (``chunk_output``). Backward: the states are recomputed rather than
kept, a reverse scan gives the gradient of each chunk's outgoing state (``chunk_state_grad``), then
dq, dk, dv of every chunk in parallel (``chunk_grad``). Operands stay in their dtype (bf16 runs the
tensor cores), every product accumulates in float32, and the carried state is float32.

The key-sum state z and the row sums r = q . z of the retention normalization are the same recurrence
with a value of ones: when they are asked for, v gets a column of ones and S a column z.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import Pieces
from .chunk_grad import chunk_grads
from .chunk_output import chunk_output
from .chunk_state import chunk_states
from .chunk_state_grad import chunk_state_grads
from .common import check_runnable, chunk_block, dot_precision


class ChunkRetention(torch.autograd.Function):
    """(q, k, v, S0) -> (o, S_final) on flattened heads: q, k (BH, T, Dk), v (BH, T, Dv), S (BH, Dk, Dv)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, S0: Tensor | None, chunk_size: int):
        chunk, block = chunk_block(chunk_size)
        precision = dot_precision(q.dtype)
        h, S = chunk_states(k, v, log_g, S0, chunk, block, precision)
        o = chunk_output(q, k, v, h, log_g, chunk, block, precision)
        ctx.save_for_backward(q, k, v, log_g, S0)
        ctx.chunking = (chunk, block, precision)
        return o, S

    @staticmethod
    def backward(ctx, do: Tensor, dS: Tensor):
        q, k, v, log_g, S0 = ctx.saved_tensors
        chunk, block, precision = ctx.chunking
        h, _ = chunk_states(k, v, log_g, S0, chunk, block, precision)
        dh, dS0 = chunk_state_grads(q, do.contiguous(), log_g, dS.contiguous(), chunk, block, precision)
        dq, dk, dv = chunk_grads(q, k, v, h, do.contiguous(), dh, log_g, chunk, block, precision)
        return dq, dk, dv, None, dS0 if S0 is not None else None, None


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
) -> Pieces:
    """Drop-in for :func:`retentive.ops.reference.chunkwise`, on the GPU (or in Triton's interpreter).

    Chunks are at most 64 tokens (``common.MAX_CHUNK``); any chunking gives the same result up to rounding.
    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv), one dtype among float32, float16, bfloat16 (q already scaled).
        log_g: (H,); S: (B, H, Dk, Dv) and z: (B, H, Dk), the incoming state (float32), or both None.
    Returns:
        Pieces: o (B, H, T, Dv) in v's dtype, r (B, H, T) float32 or None, S and z float32.
    """
    check_runnable(q, k, v)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    log_g = log_g.float().contiguous()
    if with_rowsum:  # z and r ride along as one more value column
        v = torch.cat([v, v.new_ones(B, H, T, 1)], dim=-1)  # (B, H, T, Dv + 1)
        S = None if S is None else torch.cat([S, z[..., None]], dim=-1)  # (B, H, Dk, Dv + 1)
    S0 = None if S is None else S.float().reshape(B * H, Dk, -1).contiguous()
    flat = (x.reshape(B * H, T, -1).contiguous() for x in (q, k, v))
    o, S_out = ChunkRetention.apply(*flat, log_g, S0, chunk_size)
    o, S_out = o.view(B, H, T, -1), S_out.view(B, H, Dk, -1)  # (B, H, T, Dv'), (B, H, Dk, Dv')
    if with_rowsum:
        return Pieces(o[..., :Dv], o[..., Dv].float(), S_out[..., :Dv], S_out[..., Dv])
    return Pieces(o, None, S_out, key_sum(k, log_g, z))


def key_sum(k: Tensor, log_g: Tensor, z: Tensor | None) -> Tensor:
    """z_T = gamma^T z + sum_l gamma^(T-1-l) k_l, float32 (B, H, Dk), for when no row sums are needed."""
    T = k.shape[2]
    w = torch.exp((T - 1 - torch.arange(T, device=k.device, dtype=torch.float32)) * log_g[:, None])  # (H, T)
    z_new = (w.to(k.dtype)[:, None, :] @ k).squeeze(-2).float()  # (B, H, Dk)
    return z_new if z is None else z_new + torch.exp(T * log_g)[:, None] * z
