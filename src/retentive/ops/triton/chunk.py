"""The chunkwise form in Triton, forward and backward: :meth:`~retentive.ops.backend.RetentionBackend.chunkwise`.

Forward: a scan over chunks writes the state entering each chunk (``chunk_state``), then every chunk's
output is computed in parallel (``chunk_output``). Backward: the states are recomputed rather than
kept, a reverse scan gives the gradient of each chunk's outgoing state (``chunk_state_grad``), then
dq, dk, dv of every chunk in parallel (``chunk_grad``). Operands stay in their dtype (bf16 runs the
tensor cores), every product accumulates in float32, and the carried state is float32.

The key-sum state z and the row sums r = q . z of the retention normalization are the same recurrence
with a value column of ones; the kernels carry them beside S and o (r only when asked for).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import Pieces
from .chunk_grad import chunk_grad_qk, chunk_grad_v
from .chunk_output import chunk_output
from .chunk_state import chunk_states
from .chunk_state_grad import chunk_state_grads
from .common import Tiling, check_runnable


class TritonChunkRetention(torch.autograd.Function):
    """(q, k, v, S0, z0) -> (o, r, S, z) on flattened heads: q, k (BH, T, Dk), v (BH, T, Dv), S (BH, Dk, Dv);
    ``docs`` (B, T) int32, each token's count of document starts at or before it in its row, or None."""

    @staticmethod
    def forward(ctx, q, k, v, log_g, S0, z0, chunk_size: int, with_rowsum: bool, docs):
        tiling = Tiling.of(q, v, log_g, chunk_size, has_docs=docs is not None)
        docs = log_g if docs is None else docs  # a pointer the kernels never read without documents
        h, hz, S, z = chunk_states(k, v, log_g, S0, z0, docs, tiling)
        o, r = chunk_output(q, k, v, h, hz, log_g, docs, tiling, with_rowsum)
        ctx.save_for_backward(q, k, v, log_g, S0, z0, docs)
        ctx.options = (tiling, with_rowsum)
        if not with_rowsum:
            ctx.mark_non_differentiable(r)
        return o, r, S, z

    @staticmethod
    def backward(ctx, do, dr, dS, dz):
        q, k, v, log_g, S0, z0, docs = ctx.saved_tensors
        tiling, with_rowsum = ctx.options
        do, dS, dz = (x.contiguous() for x in (do, dS, dz))
        dr = dr.contiguous() if with_rowsum else do  # without row sums the kernels never read dr
        h, hz, _, _ = chunk_states(k, v, log_g, S0, z0, docs, tiling)  # recomputed, not kept
        dh, dhz, dS0, dz0 = chunk_state_grads(q, do, dr, log_g, dS, dz, docs, tiling, with_rowsum)
        dq, dk = chunk_grad_qk(q, k, v, h, hz, do, dr, dh, dhz, log_g, docs, tiling, with_rowsum)
        dv = chunk_grad_v(q, k, v, do, dh, log_g, docs, tiling)
        has_state = S0 is not None
        return dq, dk, dv, None, dS0 if has_state else None, dz0 if has_state else None, None, None, None


@torch.compiler.disable  # torch.compile runs around the kernels (they have their own autograd), not through them
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
    starts: Tensor | None = None,
) -> Pieces:
    """See :meth:`~retentive.ops.backend.RetentionBackend.chunkwise`; on the GPU (or in Triton's interpreter).

    q, k, v in one dtype among float32, float16, bfloat16; the state S, z float32. Chunks are at most
    ``common.MAX_CHUNK`` tokens: any chunking gives the same result up to rounding. Returns o in v's dtype,
    r, S and z in float32.
    """
    check_runnable(q, k, v)
    q = q * scale  # the kernels take q scaled
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if (S is None) != (z is None):
        raise ValueError("pass the state S and z together, or neither")
    S0 = None if S is None else S.float().reshape(B * H, Dk, Dv).contiguous()
    z0 = None if z is None else z.float().reshape(B * H, Dk).contiguous()
    flat = (x.reshape(B * H, T, -1).contiguous() for x in (q, k, v))
    docs = None if starts is None else starts.cumsum(-1, dtype=torch.int32).contiguous()  # (B, T)
    o, r, S, z = TritonChunkRetention.apply(*flat, log_g.float().contiguous(), S0, z0, chunk_size, with_rowsum, docs)
    r = r.view(B, H, T) if with_rowsum else None
    return Pieces(o.view(B, H, T, Dv), r, S.view(B, H, Dk, Dv), z.view(B, H, Dk))
