"""Backward of every chunk, in parallel over chunks: dq, dk (one kernel) and dv (another).

For chunk i with (S_in, z_in) its incoming state, (dH, dZ) its outgoing state's gradient, dr the gradient
of the row sums (zero unless WITH_ROWSUM), and D the causal decay:

    dq_j = sum_{l<=j} D_jl (do_j . v_l + dr_j) k_l + gamma^(j+1) (do_j S_in^T + dr_j z_in)
    dk_l = sum_{j>=l} D_jl (do_j . v_l + dr_j) q_j + gamma^(L-1-l) (v_l dH^T + dZ)
    dv_l = sum_{j>=l} D_jl (q_j . k_l) do_j + gamma^(L-1-l) k_l dH

dq and dk reduce over Dv (a loop over Dv tiles), dv reduces over Dk (a loop over Dk tiles).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .common import block_size, chunk_decays, mma, tuned


@tuned
@triton.jit
def chunk_grad_qk_kernel(
    q,  # (BH, T, Dk)
    k,  # (BH, T, Dk)
    v,  # (BH, T, Dv)
    h,  # (BH, NT, Dk, Dv) S entering each chunk
    hz,  # (BH, NT, Dk) float32 z entering each chunk, read WITH_ROWSUM
    do,  # (BH, T, Dv)
    dr,  # (BH, T) float32, read WITH_ROWSUM
    dh,  # (BH, NT, Dk, Dv) gradient of S leaving each chunk
    dhz,  # (BH, NT, Dk) float32 gradient of z leaving each chunk
    log_g,  # (H,) float32
    dq,  # (BH, T, Dk) out
    dk,  # (BH, T, Dk) out
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
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    lg = tl.load(log_g + i_bh % H)
    j = tl.arange(0, BC)
    rk = i_k * BK + tl.arange(0, BK)
    start = i_c * CHUNK
    length = tl.minimum(CHUNK, T - start)
    rows = start + j
    row_mask = j < length
    state = (i_bh * NT + i_c) * Dk * Dv

    d_scores = tl.zeros([BC, BC], dtype=tl.float32)  # do_j . v_l
    dq_cross = tl.zeros([BC, BK], dtype=tl.float32)  # do_j S_in^T
    dk_cross = tl.zeros([BC, BK], dtype=tl.float32)  # v_l dH^T
    for i_v in range(tl.cdiv(Dv, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        rows_v = row_mask[:, None] & (rv[None, :] < Dv)
        dO = tl.load(do + i_bh * T * Dv + rows[:, None] * Dv + rv[None, :], mask=rows_v, other=0.0)  # (BC, BV)
        vt = tl.load(v + i_bh * T * Dv + rows[:, None] * Dv + rv[None, :], mask=rows_v, other=0.0)  # (BC, BV)
        tile_T = (rk[None, :] < Dk) & (rv[:, None] < Dv)
        S_T = tl.load(h + state + rk[None, :] * Dv + rv[:, None], mask=tile_T, other=0.0)  # (BV, BK)
        dH_T = tl.load(dh + state + rk[None, :] * Dv + rv[:, None], mask=tile_T, other=0.0)  # (BV, BK)
        d_scores += mma(dO, tl.trans(vt), PRECISION)
        dq_cross += mma(dO, S_T.to(dO.dtype), PRECISION)
        dk_cross += mma(vt, dH_T.to(vt.dtype), PRECISION)

    k_mask = rk < Dk
    dZ = tl.load(dhz + (i_bh * NT + i_c) * Dk + rk, mask=k_mask, other=0.0)  # (BK,)
    dk_cross += dZ[None, :]
    if WITH_ROWSUM:  # the row sums: a value column of ones, whose state column is z
        dR = tl.load(dr + i_bh * T + rows, mask=row_mask, other=0.0)  # (BC,)
        z = tl.load(hz + (i_bh * NT + i_c) * Dk + rk, mask=k_mask, other=0.0)  # (BK,)
        d_scores += dR[:, None]
        dq_cross += dR[:, None] * z[None, :]

    g_in, g_out, D = chunk_decays(lg, j, length)
    rows_k = row_mask[:, None] & k_mask[None, :]
    qt = tl.load(q + i_bh * T * Dk + rows[:, None] * Dk + rk[None, :], mask=rows_k, other=0.0)  # (BC, BK)
    kt = tl.load(k + i_bh * T * Dk + rows[:, None] * Dk + rk[None, :], mask=rows_k, other=0.0)  # (BC, BK)
    d_scores = (d_scores * D).to(qt.dtype)
    dq_t = dq_cross * g_in[:, None] + mma(d_scores, kt, PRECISION)
    dk_t = dk_cross * g_out[:, None] + mma(tl.trans(d_scores), qt, PRECISION)
    out = i_bh * T * Dk + rows[:, None] * Dk + rk[None, :]
    tl.store(dq + out, dq_t.to(dq.dtype.element_ty), mask=rows_k)
    tl.store(dk + out, dk_t.to(dk.dtype.element_ty), mask=rows_k)


@tuned
@triton.jit
def chunk_grad_v_kernel(
    q,  # (BH, T, Dk)
    k,  # (BH, T, Dk)
    do,  # (BH, T, Dv)
    dh,  # (BH, NT, Dk, Dv)
    log_g,  # (H,) float32
    dv,  # (BH, T, Dv) out
    T,
    H,
    NT,
    CHUNK,
    Dk: tl.constexpr,
    Dv: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    lg = tl.load(log_g + i_bh % H)
    j = tl.arange(0, BC)
    rv = i_v * BV + tl.arange(0, BV)
    start = i_c * CHUNK
    length = tl.minimum(CHUNK, T - start)
    rows = start + j
    row_mask = j < length

    scores_T = tl.zeros([BC, BC], dtype=tl.float32)  # k_l . q_j
    dv_cross = tl.zeros([BC, BV], dtype=tl.float32)  # k_l dH
    for i_k in range(tl.cdiv(Dk, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        kt = tl.load(  # (BC, BK)
            k + i_bh * T * Dk + rows[:, None] * Dk + rk[None, :],
            mask=row_mask[:, None] & (rk[None, :] < Dk),
            other=0.0,
        )
        qT = tl.load(  # (BK, BC)
            q + i_bh * T * Dk + rows[None, :] * Dk + rk[:, None],
            mask=row_mask[None, :] & (rk[:, None] < Dk),
            other=0.0,
        )
        dH = tl.load(  # (BK, BV)
            dh + (i_bh * NT + i_c) * Dk * Dv + rk[:, None] * Dv + rv[None, :],
            mask=(rk[:, None] < Dk) & (rv[None, :] < Dv),
            other=0.0,
        )
        scores_T += mma(kt, qT, PRECISION)
        dv_cross += mma(kt, dH.to(kt.dtype), PRECISION)

    _, g_out, D = chunk_decays(lg, j, length)
    rows_v = row_mask[:, None] & (rv[None, :] < Dv)
    dO = tl.load(do + i_bh * T * Dv + rows[:, None] * Dv + rv[None, :], mask=rows_v, other=0.0)  # (BC, BV)
    dv_t = dv_cross * g_out[:, None] + mma((scores_T * tl.trans(D)).to(dO.dtype), dO, PRECISION)
    tl.store(dv + i_bh * T * Dv + rows[:, None] * Dv + rv[None, :], dv_t.to(dv.dtype.element_ty), mask=rows_v)


def chunk_grads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    h: Tensor,
    hz: Tensor,
    do: Tensor,
    dr: Tensor,
    dh: Tensor,
    dhz: Tensor,
    log_g: Tensor,
    chunk: int,
    block: int,
    precision: str,
    with_rowsum: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk (BH, T, Dk) and dv (BH, T, Dv), in the dtypes of q, k and v."""
    BH, T, Dk = q.shape
    Dv = v.shape[-1]
    NT = h.shape[1]
    BK, BV = block_size(Dk), block_size(Dv)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    H = log_g.numel()
    chunk_grad_qk_kernel[(triton.cdiv(Dk, BK), NT, BH)](
        q, k, v, h, hz, do, dr, dh, dhz, log_g, dq, dk, T, H, NT, chunk,
        Dk=Dk, Dv=Dv, BC=block, BK=BK, BV=BV, WITH_ROWSUM=with_rowsum, PRECISION=precision,
    )  # fmt: skip
    chunk_grad_v_kernel[(triton.cdiv(Dv, BV), NT, BH)](
        q, k, do, dh, log_g, dv, T, H, NT, chunk,
        Dk=Dk, Dv=Dv, BC=block, BK=BK, BV=BV, PRECISION=precision,
    )  # fmt: skip
    return dq, dk, dv
