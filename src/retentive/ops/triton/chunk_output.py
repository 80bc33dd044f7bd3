"""Forward output of every chunk, in parallel over chunks (steps 1 and 4 of
:func:`retentive.ops.reference.chunk_pieces`).

    o_j = sum_{l<=j} gamma^(j-l) (q_j . k_l) v_l  +  gamma^(j+1) q_j S_in
    r_j = sum_{l<=j} gamma^(j-l) (q_j . k_l)      +  gamma^(j+1) q_j . z_in      (= q_j . z_j, WITH_ROWSUM)

One program computes a (chunk, BV) tile of o: it loops over Dk in tiles to form the scores q k^T and
the cross term q S_in, then weights the scores by the causal decay and multiplies by v. The programs
of the first Dv tile also write the row sums r (the same recurrence with a value of ones).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import block_size, chunk_decays, mma, tuned


@tuned
@triton.jit
def chunk_output_kernel(
    q,  # (BH, T, Dk)
    k,  # (BH, T, Dk)
    v,  # (BH, T, Dv)
    h,  # (BH, NT, Dk, Dv) S entering each chunk
    hz,  # (BH, NT, Dk) float32 z entering each chunk, read WITH_ROWSUM
    log_g,  # (H,) float32
    o,  # (BH, T, Dv) out
    r,  # (BH, T) float32 out, WITH_ROWSUM
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
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    lg = tl.load(log_g + i_bh % H)
    j = tl.arange(0, BC)
    rv = i_v * BV + tl.arange(0, BV)
    start = i_c * CHUNK
    length = tl.minimum(CHUNK, T - start)
    rows = start + j
    row_mask = j < length

    scores = tl.zeros([BC, BC], dtype=tl.float32)  # q_j . k_l
    cross = tl.zeros([BC, BV], dtype=tl.float32)  # q_j S_in
    cross_z = tl.zeros([BC], dtype=tl.float32)  # q_j . z_in
    for i_k in range(tl.cdiv(Dk, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        qt = tl.load(  # (BC, BK)
            q + i_bh * T * Dk + rows[:, None] * Dk + rk[None, :],
            mask=row_mask[:, None] & (rk[None, :] < Dk),
            other=0.0,
        )
        kT = tl.load(  # (BK, BC)
            k + i_bh * T * Dk + rows[None, :] * Dk + rk[:, None],
            mask=row_mask[None, :] & (rk[:, None] < Dk),
            other=0.0,
        )
        S = tl.load(  # (BK, BV)
            h + (i_bh * NT + i_c) * Dk * Dv + rk[:, None] * Dv + rv[None, :],
            mask=(rk[:, None] < Dk) & (rv[None, :] < Dv),
            other=0.0,
        )
        scores += mma(qt, kT, PRECISION)
        cross += mma(qt, S, PRECISION)
        if WITH_ROWSUM:
            z = tl.load(hz + (i_bh * NT + i_c) * Dk + rk, mask=rk < Dk, other=0.0)  # (BK,)
            cross_z += tl.sum(qt.to(tl.float32) * z[None, :], axis=1)

    g_in, _, D = chunk_decays(lg, j, length)
    vt = tl.load(  # (BC, BV)
        v + i_bh * T * Dv + rows[:, None] * Dv + rv[None, :],
        mask=row_mask[:, None] & (rv[None, :] < Dv),
        other=0.0,
    )
    scores = scores * D
    out = cross * g_in[:, None] + mma(scores.to(vt.dtype), vt, PRECISION)
    tl.store(
        o + i_bh * T * Dv + rows[:, None] * Dv + rv[None, :],
        out.to(o.dtype.element_ty),
        mask=row_mask[:, None] & (rv[None, :] < Dv),
    )
    if WITH_ROWSUM:
        row_sum = tl.sum(scores, axis=1) + cross_z * g_in
        tl.store(r + i_bh * T + rows, row_sum, mask=row_mask & (tl.full([BC], i_v, tl.int32) == 0))


def chunk_output(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    h: Tensor,
    hz: Tensor,
    log_g: Tensor,
    chunk: int,
    block: int,
    precision: str,
    with_rowsum: bool,
) -> tuple[Tensor, Tensor]:
    """o (BH, T, Dv) in v's dtype and r (BH, T) float32 (left unwritten unless ``with_rowsum``),
    from q, k (BH, T, Dk), v (BH, T, Dv) and the chunk states h, hz."""
    BH, T, Dk = q.shape
    Dv = v.shape[-1]
    NT = h.shape[1]
    BK, BV = block_size(Dk), block_size(Dv)
    o = v.new_empty(BH, T, Dv)
    r = torch.empty(BH, T, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Dv, BV), NT, BH)
    chunk_output_kernel[grid](
        q, k, v, h, hz, log_g, o, r, T, log_g.numel(), NT, chunk,
        Dk=Dk, Dv=Dv, BC=block, BK=BK, BV=BV, WITH_ROWSUM=with_rowsum, PRECISION=precision,
    )  # fmt: skip
    return o, r
