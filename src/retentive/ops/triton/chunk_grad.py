"""Backward of every chunk, in parallel over chunks: dq, dk (one kernel) and dv (another).

For chunk i with (S_in, z_in) its incoming state, (dH, dZ) its outgoing state's gradient, dr the gradient
of the row sums (zero unless WITH_ROWSUM), and D the causal decay:

    dq_j = sum_{l<=j} D_jl (do_j . v_l + dr_j) k_l + gamma^(j+1) (do_j S_in^T + dr_j z_in)
    dk_l = sum_{j>=l} D_jl (do_j . v_l + dr_j) q_j + gamma^(L-1-l) (v_l dH^T + dZ)
    dv_l = sum_{j>=l} D_jl (q_j . k_l) do_j + gamma^(L-1-l) k_l dH

dq and dk reduce over Dv (a loop over Dv tiles), dv reduces over Dk (a loop over Dk tiles).

dk is built transposed, dk^T = gamma^(L-1-l) (dH v^T + dZ) + q^T (D ⊙ dS) with dS_jl = do_j . v_l + dr_j, so that
the dot result D ⊙ dS enters the next dot as it is: Triton 3.4 and later on Hopper miscompile a dot result that is
transposed and fed into another dot (flash-linear-attention issue 640, dk wrong). No kernel here transposes a dot
result; the transposes are of tiles read from memory, loaded transposed.
"""

from __future__ import annotations

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
)


@tuned
@triton.jit
def chunk_grad_qk_kernel(
    q, k, v, h, hz, do, dr, dh, dhz, log_g, dq, dk, docs,
    T, H, NT, CHUNK, Dk: tl.constexpr, Dv: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    WITH_ROWSUM: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """q, k (BH, T, Dk), v (BH, T, Dv), the state entering each chunk h (BH, NT, Dk, Dv), hz (BH, NT, Dk) float32,
    do (BH, T, Dv), dr (BH, T) float32 (hz and dr read WITH_ROWSUM), the gradient of the state leaving each chunk
    dh (BH, NT, Dk, Dv), dhz (BH, NT, Dk) float32, log_g (H,) float32 -> dq, dk (BH, T, Dk)."""
    i_bh, lg, i_c, rows, length, keys = chunk_program(log_g, H, T, CHUNK, BC, Dk, BK)
    state = i_bh * NT + i_c  # this chunk's entry in h, hz, dh and dhz

    d_scores = tl.zeros([BC, BC], dtype=tl.float32)  # do_j . v_l
    dq_cross = tl.zeros([BC, BK], dtype=tl.float32)  # do_j S_in^T
    dk_cross_T = tl.zeros([BK, BC], dtype=tl.float32)  # dH v_l^T
    for i_v in range(tl.cdiv(Dv, BV)):
        values = features(i_v, BV, Dv)
        dO = load(tile(do, i_bh, T, Dv, rows, values))  # (BC, BV)
        vT = load(tile(v, i_bh, T, Dv, rows, values, TRANSPOSED=True))  # (BV, BC)
        S_T = load(tile(h, state, Dk, Dv, keys, values, TRANSPOSED=True))  # (BV, BK)
        dH = load(tile(dh, state, Dk, Dv, keys, values))  # (BK, BV)
        d_scores += mma(dO, vT, PRECISION)
        dq_cross += mma(dO, S_T.to(dO.dtype), PRECISION)
        dk_cross_T += mma(dH.to(vT.dtype), vT, PRECISION)

    dZ = load(vector(dhz, state, Dk, keys))  # (BK,)
    dk_cross_T += dZ[:, None]
    if WITH_ROWSUM:  # the row sums: a value column of ones, whose state column is z
        dR = load(vector(dr, i_bh, T, rows))  # (BC,)
        z = load(vector(hz, state, Dk, keys))  # (BK,)
        d_scores += dR[:, None]
        dq_cross += dR[:, None] * z[None, :]

    doc, last = chunk_documents(docs, i_bh, H, T, i_c, CHUNK, BC, HAS_DOCS)
    g_in, g_out, D = chunk_decays(lg, length, BC, doc, last, HAS_DOCS)
    qT = load(tile(q, i_bh, T, Dk, rows, keys, TRANSPOSED=True))  # (BK, BC)
    kt = load(tile(k, i_bh, T, Dk, rows, keys))  # (BC, BK)
    d_scores = (d_scores * D).to(kt.dtype)
    store(tile(dq, i_bh, T, Dk, rows, keys), dq_cross * g_in[:, None] + mma(d_scores, kt, PRECISION))
    dk_T = dk_cross_T * g_out[None, :] + mma(qT, d_scores, PRECISION)  # (BK, BC)
    store(tile(dk, i_bh, T, Dk, rows, keys, TRANSPOSED=True), dk_T)


@tuned
@triton.jit
def chunk_grad_v_kernel(
    q, k, do, dh, log_g, dv, docs,
    T, H, NT, CHUNK, Dk: tl.constexpr, Dv: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """q, k (BH, T, Dk), do (BH, T, Dv), the gradient of the state leaving each chunk dh (BH, NT, Dk, Dv), log_g
    (H,) float32 -> dv (BH, T, Dv)."""
    i_bh, lg, i_c, rows, length, values = chunk_program(log_g, H, T, CHUNK, BC, Dv, BV)

    scores_T = tl.zeros([BC, BC], dtype=tl.float32)  # k_l . q_j
    dv_cross = tl.zeros([BC, BV], dtype=tl.float32)  # k_l dH
    for i_k in range(tl.cdiv(Dk, BK)):
        keys = features(i_k, BK, Dk)
        kt = load(tile(k, i_bh, T, Dk, rows, keys))  # (BC, BK)
        qT = load(tile(q, i_bh, T, Dk, rows, keys, TRANSPOSED=True))  # (BK, BC)
        dH = load(tile(dh, i_bh * NT + i_c, Dk, Dv, keys, values))  # (BK, BV)
        scores_T += mma(kt, qT, PRECISION)
        dv_cross += mma(kt, dH.to(kt.dtype), PRECISION)

    doc, last = chunk_documents(docs, i_bh, H, T, i_c, CHUNK, BC, HAS_DOCS)
    _, g_out, D = chunk_decays(lg, length, BC, doc, last, HAS_DOCS)
    dO = load(tile(do, i_bh, T, Dv, rows, values))  # (BC, BV)
    dv_t = dv_cross * g_out[:, None] + mma((scores_T * tl.trans(D)).to(dO.dtype), dO, PRECISION)
    store(tile(dv, i_bh, T, Dv, rows, values), dv_t)


def chunk_grad_qk(
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
    docs: Tensor,
    t: Tiling,
    with_rowsum: bool,
) -> tuple[Tensor, Tensor]:
    """dq, dk (BH, T, Dk) in the dtypes of q and k."""
    dq, dk = q.new_empty(q.shape), k.new_empty(k.shape)
    chunk_grad_qk_kernel[t.chunk_grid(t.Dk, t.BK)](
        q, k, v, h, hz, do, dr, dh, dhz, log_g, dq, dk, docs, *t.sizes, WITH_ROWSUM=with_rowsum, **t.meta
    )
    return dq, dk


def chunk_grad_v(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, dh: Tensor, log_g: Tensor, docs: Tensor, t: Tiling
) -> Tensor:
    """dv (BH, T, Dv) in v's dtype (v gives its shape and dtype; the kernel does not read it)."""
    dv = v.new_empty(v.shape)
    chunk_grad_v_kernel[t.chunk_grid(t.Dv, t.BV)](q, k, do, dh, log_g, dv, docs, *t.sizes, **t.meta)
    return dv
