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

from .common import Tiling, chunk_documents, chunk_rows, load, scan_program, scan_step, store_state, tile, tuned, vector


@tuned
@triton.jit
def chunk_state_grad_kernel(
    q, do, dr, log_g, dS_final, dz_final, dh, dhz, dS0, dz0, docs,
    T, H, NT, CHUNK, Dk: tl.constexpr, Dv: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    WITH_ROWSUM: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """q (BH, T, Dk), do (BH, T, Dv), dr (BH, T) float32 (read WITH_ROWSUM), log_g (H,) float32 and the gradient
    of the final state dS_final (BH, Dk, Dv), dz_final (BH, Dk) float32 -> dh (BH, NT, Dk, Dv) in q's dtype and
    dhz (BH, NT, Dk) float32, the gradient of the state leaving each chunk, and that of the initial state dS0
    (BH, Dk, Dv), dz0 (BH, Dk) float32."""
    i_bh, lg, keys, values, z_keys = scan_program(log_g, H, Dk, Dv, BK, BV)

    dH = load(tile(dS_final, i_bh, Dk, Dv, keys, values))  # (BK, BV)
    dZ = load(vector(dz_final, i_bh, Dk, keys))  # (BK,)
    for n in range(NT):
        i = NT - 1 - n
        store_state(dh, dhz, i_bh * NT + i, dH, dZ, Dk, Dv, keys, values, z_keys)
        rows, length = chunk_rows(i, CHUNK, T, BC)
        qT = load(tile(q, i_bh, T, Dk, rows, keys, TRANSPOSED=True))  # (BK, BC)
        dO = load(tile(do, i_bh, T, Dv, rows, values))  # (BC, BV)
        doc, last = chunk_documents(docs, i_bh, H, T, i, CHUNK, BC, HAS_DOCS)
        # the queries decayed from the chunk's start
        dH, q_in, g_chunk = scan_step(dH, qT, dO, lg, length, doc, last, BC, False, PRECISION, HAS_DOCS)
        dZ = dZ * g_chunk
        if WITH_ROWSUM:
            dR = load(vector(dr, i_bh, T, rows))  # (BC,)
            dZ += tl.sum(q_in * dR[None, :], axis=1)
    store_state(dS0, dz0, i_bh, dH, dZ, Dk, Dv, keys, values, z_keys)


def chunk_state_grads(
    q: Tensor, do: Tensor, dr: Tensor, log_g: Tensor, dS: Tensor, dz: Tensor, docs: Tensor, t: Tiling, with_rowsum: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the reverse scan.

    Returns:
        dh: (BH, NT, Dk, Dv) in q's dtype and dhz: (BH, NT, Dk) float32, the gradient of each chunk's
        outgoing state; dS0: (BH, Dk, Dv) and dz0: (BH, Dk) float32, that of the initial state.
    """
    dh = q.new_empty(t.BH, t.NT, t.Dk, t.Dv)
    dhz = torch.empty(t.BH, t.NT, t.Dk, device=q.device, dtype=torch.float32)
    dS0 = torch.empty(t.BH, t.Dk, t.Dv, device=q.device, dtype=torch.float32)
    dz0 = torch.empty(t.BH, t.Dk, device=q.device, dtype=torch.float32)
    chunk_state_grad_kernel[t.scan_grid()](
        q, do, dr, log_g, dS, dz, dh, dhz, dS0, dz0, docs, *t.sizes, WITH_ROWSUM=with_rowsum, **t.meta
    )
    return dh, dhz, dS0, dz0
