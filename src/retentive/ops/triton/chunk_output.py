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

from .common import (
    Tiling,
    chunk_decays,
    chunk_documents,
    chunk_program,
    features,
    load,
    mma,
    store,
    tile,
    tuned,
    vector,
    written_once,
)


@tuned
@triton.jit
def chunk_output_kernel(
    q, k, v, h, hz, log_g, o, r, docs,
    T, H, NT, CHUNK, Dk: tl.constexpr, Dv: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    WITH_ROWSUM: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """q, k (BH, T, Dk), v (BH, T, Dv), the state entering each chunk h (BH, NT, Dk, Dv) and hz (BH, NT, Dk)
    float32 (read WITH_ROWSUM), log_g (H,) float32 -> o (BH, T, Dv) and, WITH_ROWSUM, r (BH, T) float32."""
    i_bh, lg, i_c, rows, length, values = chunk_program(log_g, H, T, CHUNK, BC, Dv, BV)
    state = i_bh * NT + i_c  # this chunk's entry in h and hz

    scores = tl.zeros([BC, BC], dtype=tl.float32)  # q_j . k_l
    cross = tl.zeros([BC, BV], dtype=tl.float32)  # q_j S_in
    cross_z = tl.zeros([BC], dtype=tl.float32)  # q_j . z_in
    for i_k in range(tl.cdiv(Dk, BK)):
        keys = features(i_k, BK, Dk)
        qt = load(tile(q, i_bh, T, Dk, rows, keys))  # (BC, BK)
        kT = load(tile(k, i_bh, T, Dk, rows, keys, TRANSPOSED=True))  # (BK, BC)
        S = load(tile(h, state, Dk, Dv, keys, values))  # (BK, BV)
        scores += mma(qt, kT, PRECISION)
        cross += mma(qt, S, PRECISION)
        if WITH_ROWSUM:
            z = load(vector(hz, state, Dk, keys))  # (BK,)
            cross_z += tl.sum(qt.to(tl.float32) * z[None, :], axis=1)

    doc, last = chunk_documents(docs, i_bh, H, T, i_c, CHUNK, BC, HAS_DOCS)
    g_in, _, D = chunk_decays(lg, length, BC, doc, last, HAS_DOCS)
    vt = load(tile(v, i_bh, T, Dv, rows, values))  # (BC, BV)
    scores = scores * D
    store(tile(o, i_bh, T, Dv, rows, values), cross * g_in[:, None] + mma(scores.to(vt.dtype), vt, PRECISION))
    if WITH_ROWSUM:  # the first Dv tile's programs write r
        store(vector(r, i_bh, T, written_once(rows, 0)), tl.sum(scores, axis=1) + cross_z * g_in)


def chunk_output(
    q: Tensor, k: Tensor, v: Tensor, h: Tensor, hz: Tensor, log_g: Tensor, docs: Tensor, t: Tiling, with_rowsum: bool
) -> tuple[Tensor, Tensor]:
    """o (BH, T, Dv) in v's dtype and r (BH, T) float32 (left unwritten unless ``with_rowsum``),
    from q, k (BH, T, Dk), v (BH, T, Dv) and the chunk states h, hz."""
    o = v.new_empty(t.BH, t.T, t.Dv)
    r = torch.empty(t.BH, t.T, device=q.device, dtype=torch.float32)
    chunk_output_kernel[t.chunk_grid(t.Dv, t.BV)](
        q, k, v, h, hz, log_g, o, r, docs, *t.sizes, WITH_ROWSUM=with_rowsum, **t.meta
    )
    return o, r
