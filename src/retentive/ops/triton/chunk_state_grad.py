"""Backward scan over chunks, last to first: the gradient of the state leaving every chunk.

With dH_i the gradient of the loss with respect to the state entering chunk i (dH_NT = dS_final):

    dH_i = gamma^L dH_{i+1} + sum_j gamma^(j+1) q_j^T do_j

One program owns a (BK, BV) tile of dH for one head; it writes dH_{i+1} to ``dh`` before folding in
chunk i, and ends with dH_0, the gradient of the initial state.
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
    log_g,  # (H,) float32
    dS_final,  # (BH, Dk, Dv) float32, read when HAS_DS
    dh,  # (BH, NT, Dk, Dv) out: the gradient of the state leaving each chunk
    dS0,  # (BH, Dk, Dv) float32 out
    T,
    H,
    NT,
    CHUNK,
    Dk: tl.constexpr,
    Dv: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    lg = tl.load(log_g + i_bh % H)
    j = tl.arange(0, BC)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    tile = rk[:, None] * Dv + rv[None, :]
    tile_mask = (rk[:, None] < Dk) & (rv[None, :] < Dv)

    dH = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DS:
        dH += tl.load(dS_final + i_bh * Dk * Dv + tile, mask=tile_mask, other=0.0)
    for n in range(NT):
        i = NT - 1 - n
        tl.store(dh + (i_bh * NT + i) * Dk * Dv + tile, dH.to(dh.dtype.element_ty), mask=tile_mask)
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
        q_in = (qT * g_in[None, :]).to(dO.dtype)
        dH = dH * tl.exp(length.to(tl.float32) * lg) + mma(q_in, dO, PRECISION)
    tl.store(dS0 + i_bh * Dk * Dv + tile, dH, mask=tile_mask)


def chunk_state_grads(
    q: Tensor, do: Tensor, log_g: Tensor, dS: Tensor | None, chunk: int, block: int, precision: str
) -> tuple[Tensor, Tensor]:
    """dh (BH, NT, Dk, Dv) in q's dtype, the gradient of each chunk's outgoing state, and dS0 (BH, Dk, Dv) float32."""
    BH, T, Dk = q.shape
    Dv = do.shape[-1]
    NT = triton.cdiv(T, chunk)
    BK, BV = block_size(Dk), block_size(Dv)
    dh = q.new_empty(BH, NT, Dk, Dv)
    dS0 = torch.empty(BH, Dk, Dv, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Dk, BK), triton.cdiv(Dv, BV), BH)
    chunk_state_grad_kernel[grid](
        q, do, log_g, dS if dS is not None else dS0, dh, dS0, T, log_g.numel(), NT, chunk,
        Dk=Dk, Dv=Dv, BC=block, BK=BK, BV=BV, HAS_DS=dS is not None, PRECISION=precision,
    )  # fmt: skip
    return dh, dS0
