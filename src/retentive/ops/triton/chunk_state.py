"""Forward scan over chunks: the state entering every chunk, and the final state (step 3 of
:func:`retentive.ops.reference.chunk_pieces`).

    S_next = gamma^L S_prev + sum_l gamma^(L-1-l) k_l^T v_l      (L the length of the chunk)
    z_next = gamma^L z_prev + sum_l gamma^(L-1-l) k_l            (the key sum of the retention normalization)

One program owns a (BK, BV) tile of S for one head and walks the chunks in order, keeping its tile in
float32 registers; it writes the tile it holds at the start of each chunk to ``h``, which the output
kernel (and the backward pass) read in parallel over chunks. The programs of the first Dv tile also
carry the matching (BK,) slice of z and write it to ``hz``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import block_size, chunk_decays, mma, tuned


@tuned
@triton.jit
def chunk_state_kernel(
    k,  # (BH, T, Dk)
    v,  # (BH, T, Dv)
    log_g,  # (H,) float32
    S0,  # (BH, Dk, Dv) float32, read when HAS_S0
    z0,  # (BH, Dk) float32, read when HAS_S0
    h,  # (BH, NT, Dk, Dv) out: S entering each chunk, in the dtype of k
    hz,  # (BH, NT, Dk) float32 out: z entering each chunk
    S_final,  # (BH, Dk, Dv) float32 out
    z_final,  # (BH, Dk) float32 out
    T,
    H,
    NT,
    CHUNK,  # tokens per chunk (the last one may be shorter)
    Dk: tl.constexpr,
    Dv: tl.constexpr,
    BC: tl.constexpr,  # power-of-two tile >= CHUNK
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_S0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    lg = tl.load(log_g + i_bh % H)
    j = tl.arange(0, BC)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    tile = rk[:, None] * Dv + rv[None, :]  # (BK, BV) offsets in one Dk x Dv matrix
    tile_mask = (rk[:, None] < Dk) & (rv[None, :] < Dv)
    z_mask = (rk < Dk) & (tl.full([BK], i_v, tl.int32) == 0)  # one program per Dk slice writes z

    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_S0:
        S += tl.load(S0 + i_bh * Dk * Dv + tile, mask=tile_mask, other=0.0)
        z += tl.load(z0 + i_bh * Dk + rk, mask=rk < Dk, other=0.0)
    for i in range(NT):
        tl.store(h + (i_bh * NT + i) * Dk * Dv + tile, S.to(h.dtype.element_ty), mask=tile_mask)
        tl.store(hz + (i_bh * NT + i) * Dk + rk, z, mask=z_mask)
        start = i * CHUNK
        length = tl.minimum(CHUNK, T - start)
        rows = start + j
        kT = tl.load(  # (BK, BC)
            k + i_bh * T * Dk + rows[None, :] * Dk + rk[:, None],
            mask=(j[None, :] < length) & (rk[:, None] < Dk),
            other=0.0,
        )
        vt = tl.load(  # (BC, BV)
            v + i_bh * T * Dv + rows[:, None] * Dv + rv[None, :],
            mask=(j[:, None] < length) & (rv[None, :] < Dv),
            other=0.0,
        )
        _, g_out, _ = chunk_decays(lg, j, length)
        k_out = kT.to(tl.float32) * g_out[None, :]  # keys decayed to the chunk end
        g_chunk = tl.exp(length.to(tl.float32) * lg)
        S = S * g_chunk + mma(k_out.to(vt.dtype), vt, PRECISION)
        z = z * g_chunk + tl.sum(k_out, axis=1)
    tl.store(S_final + i_bh * Dk * Dv + tile, S, mask=tile_mask)
    tl.store(z_final + i_bh * Dk + rk, z, mask=z_mask)


def chunk_states(
    k: Tensor, v: Tensor, log_g: Tensor, S0: Tensor | None, z0: Tensor | None, chunk: int, block: int, precision: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the scan.

    Args:
        k: (BH, T, Dk), v: (BH, T, Dv) contiguous; log_g: (H,) float32; S0: (BH, Dk, Dv) and z0: (BH, Dk)
            float32, or both None. chunk: tokens per chunk; block: its power-of-two tile.
    Returns:
        h: (BH, NT, Dk, Dv) in k's dtype and hz: (BH, NT, Dk) float32, the state entering each chunk;
        S: (BH, Dk, Dv) and z: (BH, Dk) float32, the final state.
    """
    BH, T, Dk = k.shape
    Dv = v.shape[-1]
    NT = triton.cdiv(T, chunk)
    BK, BV = block_size(Dk), block_size(Dv)
    h = k.new_empty(BH, NT, Dk, Dv)
    hz = torch.empty(BH, NT, Dk, device=k.device, dtype=torch.float32)
    S = torch.empty(BH, Dk, Dv, device=k.device, dtype=torch.float32)
    z = torch.empty(BH, Dk, device=k.device, dtype=torch.float32)
    has_s0 = S0 is not None
    grid = (triton.cdiv(Dk, BK), triton.cdiv(Dv, BV), BH)
    chunk_state_kernel[grid](
        k, v, log_g, S0 if has_s0 else S, z0 if has_s0 else z, h, hz, S, z, T, log_g.numel(), NT, chunk,
        Dk=Dk, Dv=Dv, BC=block, BK=BK, BV=BV, HAS_S0=has_s0, PRECISION=precision,
    )  # fmt: skip
    return h, hz, S, z
