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

from .common import Tiling, chunk_documents, chunk_rows, load, scan_program, scan_step, store_state, tile, tuned, vector


@tuned
@triton.jit
def chunk_state_kernel(
    k, v, log_g, S0, z0, h, hz, S_final, z_final, docs,
    T, H, NT, CHUNK, Dk: tl.constexpr, Dv: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_S0: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """k (BH, T, Dk), v (BH, T, Dv), log_g (H,) float32 and, when HAS_S0, the initial state S0 (BH, Dk, Dv), z0
    (BH, Dk) float32 -> h (BH, NT, Dk, Dv) in k's dtype and hz (BH, NT, Dk) float32, the state entering each chunk,
    and the final state S_final (BH, Dk, Dv), z_final (BH, Dk) float32."""
    i_bh, lg, keys, values, z_keys = scan_program(log_g, H, Dk, Dv, BK, BV)

    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_S0:
        S += load(tile(S0, i_bh, Dk, Dv, keys, values))
        z += load(vector(z0, i_bh, Dk, keys))
    for i in range(NT):
        store_state(h, hz, i_bh * NT + i, S, z, Dk, Dv, keys, values, z_keys)
        rows, length = chunk_rows(i, CHUNK, T, BC)
        kT = load(tile(k, i_bh, T, Dk, rows, keys, TRANSPOSED=True))  # (BK, BC)
        vt = load(tile(v, i_bh, T, Dv, rows, values))  # (BC, BV)
        doc, last = chunk_documents(docs, i_bh, H, T, i, CHUNK, BC, HAS_DOCS)
        # the keys decayed to the chunk's end
        S, k_out, g_chunk = scan_step(S, kT, vt, lg, length, doc, last, BC, True, PRECISION, HAS_DOCS)
        z = z * g_chunk + tl.sum(k_out, axis=1)
    store_state(S_final, z_final, i_bh, S, z, Dk, Dv, keys, values, z_keys)


def chunk_states(
    k: Tensor, v: Tensor, log_g: Tensor, S0: Tensor | None, z0: Tensor | None, docs: Tensor, t: Tiling
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the scan.

    Args:
        k: (BH, T, Dk), v: (BH, T, Dv) contiguous; log_g: (H,) float32; S0: (BH, Dk, Dv) and z0: (BH, Dk)
            float32, or both None; docs: (B, T) int32, read if t.has_docs; t: the tiling of this call.
    Returns:
        h: (BH, NT, Dk, Dv) in k's dtype and hz: (BH, NT, Dk) float32, the state entering each chunk;
        S: (BH, Dk, Dv) and z: (BH, Dk) float32, the final state.
    """
    h = k.new_empty(t.BH, t.NT, t.Dk, t.Dv)
    hz = torch.empty(t.BH, t.NT, t.Dk, device=k.device, dtype=torch.float32)
    S = torch.empty(t.BH, t.Dk, t.Dv, device=k.device, dtype=torch.float32)
    z = torch.empty(t.BH, t.Dk, device=k.device, dtype=torch.float32)
    has_s0 = S0 is not None
    chunk_state_kernel[t.scan_grid()](
        k, v, log_g, S0 if has_s0 else S, z0 if has_s0 else z, h, hz, S, z, docs, *t.sizes, HAS_S0=has_s0, **t.meta
    )
    return h, hz, S, z
