"""Backward scan over chunks, last to first: the gradient of the state leaving every chunk.

With dH_i, dZ_i the gradients of the loss with respect to S and z entering chunk i (dH_NT = dS_final,
dZ_NT = dz_final), and dr the gradient of the row sums (WITH_ROWSUM):

    dH_i = gamma^L dH_{i+1} + sum_j gamma^(j+1) q_j^T do_j
    dZ_i = gamma^L dZ_{i+1} + sum_j gamma^(j+1) dr_j q_j

One program owns a (BK, BV) tile of dH for one head (and, in the first Dv tile, the (BK,) slice of dZ);
it writes dH_{i+1}, dZ_{i+1} to ``dh``, ``dhz`` before folding in chunk i, and ends with the gradient of
the initial state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import block_size, chunk_decays, mma, tuned


@tuned
@triton.jit
def chunk_state_grad_kernel(
    q,  # (BH, T, Dk)
    do,  # (BH, T, Dv)
    dr,  # (BH, T) float32, read WITH_ROWSUM
    log_g,  # (H,) float32
    dS_final,  # (BH, Dk, Dv) float32
    dz_final,  # (BH, Dk) float32
    dh,  # (BH, NT, Dk, Dv) out: the gradient of S leaving each chunk
    dhz,  # (BH, NT, Dk) float32 out: the gradient of z leaving each chunk
    dS0,  # (BH, Dk, Dv) float32 out
    dz0,  # (BH, Dk) float32 out
    T,
    H,
    NT,
    CHUNK,
    Dk: tl.constexpr,
    Dv: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    WITH_ROWSUM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    lg = tl.load(log_g + i_bh % H)
    j = tl.arange(0, BC)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    tile = rk[:, None] * Dv + rv[None, :]
    tile_mask = (rk[:, None] < Dk) & (rv[None, :] < Dv)
    z_mask = (rk < Dk) & (tl.full([BK], i_v, tl.int32) == 0)  # one program per Dk slice writes dz

    dH = tl.load(dS_final + i_bh * Dk * Dv + tile, mask=tile_mask, other=0.0)  # (BK, BV)
    dZ = tl.load(dz_final + i_bh * Dk + rk, mask=rk < Dk, other=0.0)  # (BK,)
    for n in range(NT):
        i = NT - 1 - n
        tl.store(dh + (i_bh * NT + i) * Dk * Dv + tile, dH.to(dh.dtype.element_ty), mask=tile_mask)
        tl.store(dhz + (i_bh * NT + i) * Dk + rk, dZ, mask=z_mask)
        start = i * CHUNK
        length = tl.minimum(CHUNK, T - start)
        rows = start + j
        qT = tl.load(  # (BK, BC)
            q + i_bh * T * Dk + rows[None, :] * Dk + rk[:, None],
            mask=(j[None, :] < length) & (rk[:, None] < Dk),
            other=0.0,
        )
        dO = tl.load(  # (BC, BV)
            do + i_bh * T * Dv + rows[:, None] * Dv + rv[None, :],
            mask=(j[:, None] < length) & (rv[None, :] < Dv),
            other=0.0,
        )
        g_in, _, _ = chunk_decays(lg, j, length)
        q_in = qT.to(tl.float32) * g_in[None, :]  # (BK, BC)
        g_chunk = tl.exp(length.to(tl.float32) * lg)
        dH = dH * g_chunk + mma(q_in.to(dO.dtype), dO, PRECISION)
        dZ = dZ * g_chunk
        if WITH_ROWSUM:
            dR = tl.load(dr + i_bh * T + rows, mask=j < length, other=0.0)  # (BC,)
            dZ += tl.sum(q_in * dR[None, :], axis=1)
    tl.store(dS0 + i_bh * Dk * Dv + tile, dH, mask=tile_mask)
    tl.store(dz0 + i_bh * Dk + rk, dZ, mask=z_mask)


def chunk_state_grads(
    q: Tensor,
    do: Tensor,
    dr: Tensor,
    log_g: Tensor,
    dS: Tensor,
    dz: Tensor,
    chunk: int,
    block: int,
    precision: str,
    with_rowsum: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the reverse scan.

    Returns:
        dh: (BH, NT, Dk, Dv) in q's dtype and dhz: (BH, NT, Dk) float32, the gradient of each chunk's
        outgoing state; dS0: (BH, Dk, Dv) and dz0: (BH, Dk) float32, that of the initial state.
    """
    BH, T, Dk = q.shape
    Dv = do.shape[-1]
    NT = triton.cdiv(T, chunk)
    BK, BV = block_size(Dk), block_size(Dv)
    dh = q.new_empty(BH, NT, Dk, Dv)
    dhz = torch.empty(BH, NT, Dk, device=q.device, dtype=torch.float32)
    dS0 = torch.empty(BH, Dk, Dv, device=q.device, dtype=torch.float32)
    dz0 = torch.empty(BH, Dk, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Dk, BK), triton.cdiv(Dv, BV), BH)
    chunk_state_grad_kernel[grid](
        q, do, dr, log_g, dS, dz, dh, dhz, dS0, dz0, T, log_g.numel(), NT, chunk,
        Dk=Dk, Dv=Dv, BC=block, BK=BK, BV=BV, WITH_ROWSUM=with_rowsum, PRECISION=precision,
    )  # fmt: skip
    return dh, dhz, dS0, dz0
