"""The recurrent form in Triton: one decoding step for every head, the normalizations fused (docs/math.md,
Normalizations).

    S_n = gamma S_{n-1} + k_n^T v_n,   z_n = gamma z_{n-1} + k_n,   o_n = q_n S_n,   r_n = q_n . z_n
    (decay normalization)      o_n, r_n <- o_n / sqrt(c_n), r_n / sqrt(c_n),  c_n = (1 - gamma^(n+1)) / (1 - gamma)
    (retention normalization)  o_n <- o_n / max(|r_n|, 1)

One program updates a (Dk, BV) slice of one head's S: the step reads and writes the state once, which
is all the memory traffic it needs besides q, k, v.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..state import RetentionState
from .chunk import chunkwise
from .common import MAX_CHUNK, block_size, check_runnable, features, load, program_head, store, tile, vector

STEP_BV = 32  # Dv columns of S per program: Dk x 32 float32 (32 KB at dk 256) keeps 8 x 16 programs busy at batch 1


@triton.jit
def expm1(x):
    """exp(x) - 1 without the cancellation of small x (a Taylor series below |x| = 0.1)."""
    series = x * (1 + x / 2 * (1 + x / 3 * (1 + x / 4 * (1 + x / 5 * (1 + x / 6)))))
    return tl.where(tl.abs(x) < 0.1, series, tl.exp(x) - 1)


@triton.jit
def decode_step_kernel(
    q,  # (BH, Dk)
    k,  # (BH, Dk)
    v,  # (BH, Dv)
    log_g,  # (H,) float32
    offset,  # (B,) int64 absolute position of this token
    S,  # (BH, Dk, Dv) float32
    z,  # (BH, Dk) float32
    S_out,  # (BH, Dk, Dv) float32 out, may be S itself
    z_out,  # (BH, Dk) float32 out, never z itself: every program reads z
    o,  # (BH, Dv) out
    scale,
    H,
    Dk: tl.constexpr,
    Dv: tl.constexpr,
    BK: tl.constexpr,  # >= Dk: one program holds whole columns of S
    BV: tl.constexpr,
    NORMALIZE_DECAY: tl.constexpr,
    NORMALIZE_RETENTION: tl.constexpr,
):
    i_bh, lg = program_head(log_g, H, 1)
    keys = features(0, BK, Dk)
    values = features(tl.program_id(0), BV, Dv)
    q_n = load(vector(q, i_bh, Dk, keys)).to(tl.float32) * scale
    k_n = load(vector(k, i_bh, Dk, keys)).to(tl.float32)
    v_n = load(vector(v, i_bh, Dv, values)).to(tl.float32)
    gamma = tl.exp(lg)

    S_n = load(tile(S, i_bh, Dk, Dv, keys, values)) * gamma + k_n[:, None] * v_n[None, :]  # (BK, BV)
    store(tile(S_out, i_bh, Dk, Dv, keys, values), S_n)
    z_n = load(vector(z, i_bh, Dk, keys)) * gamma + k_n  # (BK,)
    if tl.program_id(0) == 0:
        store(vector(z_out, i_bh, Dk, keys), z_n)

    o_n = tl.sum(q_n[:, None] * S_n, axis=0)  # (BV,)
    r_n = tl.sum(q_n * z_n, axis=0)
    if NORMALIZE_DECAY:
        n = tl.maximum(tl.load(offset + i_bh // H), 0).to(tl.float32)
        root_c = tl.sqrt(expm1((n + 1) * lg) / expm1(lg))
        o_n = o_n / root_c
        r_n = r_n / root_c
    if NORMALIZE_RETENTION:
        o_n = o_n / tl.maximum(tl.abs(r_n), 1.0)
    store(vector(o, i_bh, Dv, values), o_n)


def _step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    offset: Tensor,
    S: Tensor,
    z: Tensor,
    S_out: Tensor,
    *,
    scale: float,
    normalize_decay: bool,
    normalize_retention: bool,
) -> tuple[Tensor, Tensor]:
    """Launch one step on q, k (B, H, 1, Dk), v (B, H, 1, Dv) and a float32 state S, z (contiguous).

    S_out may be S (in place). Returns o (B, H, 1, Dv) in v's dtype and the new z (a new tensor).
    """
    check_runnable(q, k, v)
    B, H, _, Dk = q.shape
    Dv = v.shape[-1]
    o = v.new_empty(B, H, 1, Dv)
    z_out = torch.empty_like(z)
    BV = block_size(Dv, limit=STEP_BV)
    decode_step_kernel[(triton.cdiv(Dv, BV), B * H)](
        q.contiguous(), k.contiguous(), v.contiguous(), log_g.float().contiguous(), offset.contiguous(),
        S, z, S_out, z_out, o, scale, H,
        Dk=Dk, Dv=Dv, BK=triton.next_power_of_2(Dk), BV=BV,
        NORMALIZE_DECAY=normalize_decay, NORMALIZE_RETENTION=normalize_retention,
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return o, z_out


@torch.compiler.disable
def decode_step_(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    state: RetentionState,
    *,
    scale: float | None = None,
    normalize_decay: bool = False,
    normalize_retention: bool = False,
) -> Tensor:
    """:func:`decode_step` that updates ``state`` in place (S, z and offset) instead of returning a new one.

    q, k, v and log_g as in :meth:`~retentive.ops.backend.RetentionBackend.decode_step`, in one dtype among
    float32, float16, bfloat16; ``state``: a contiguous float32 S (B, H, Dk, Dv), z (B, H, Dk) on q's device.
    ``scale`` defaults to Dk^-1/2. Returns o (B, H, 1, Dv) in v's dtype, normalized as asked.
    """
    if q.shape[2] != 1:
        raise ValueError(f"decode_step_ reads one token per row, got q of shape {tuple(q.shape)}")
    if not _writable(state):
        raise ValueError("decode_step_ updates a contiguous float32 state in place: pass RetentionState.zeros(...)")
    o, _ = decode_step(
        q, k, v, log_g, state,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        normalize_decay=normalize_decay, normalize_retention=normalize_retention, output_state=False, overwrite=True,
    )  # fmt: skip
    state.offset += 1
    return o


def _writable(state: RetentionState) -> bool:
    """Whether the kernel can write a step's new S and z over ``state``'s: float32 and contiguous."""
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in (state.S, state.z))


@torch.compiler.disable
def decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    state: RetentionState | None,
    *,
    scale: float,
    normalize_decay: bool,
    normalize_retention: bool,
    output_state: bool,
    overwrite: bool = False,
) -> tuple[Tensor, RetentionState | None]:
    """See :meth:`~retentive.ops.backend.RetentionBackend.decode_step`: one fused kernel. With ``overwrite``, the
    new S goes over the given one where that is a contiguous float32 tensor (each program reads its slice of S
    before writing it), and the new z is copied over the given z (every program reads all of z)."""
    B, H, _, Dk = q.shape
    if state is None:
        state = RetentionState.zeros(B, H, Dk, v.shape[-1], device=q.device)
    in_place = overwrite and _writable(state)
    S, z = (state.S, state.z) if in_place else (state.S.float().contiguous(), state.z.float().contiguous())
    S_out = S if in_place else torch.empty_like(S)
    o, z_out = _step(
        q, k, v, log_g, state.offset, S, z, S_out,
        scale=scale, normalize_decay=normalize_decay, normalize_retention=normalize_retention,
    )  # fmt: skip
    if in_place:
        z_out = z.copy_(z_out)
    return o, RetentionState(S_out, z_out, state.offset + 1) if output_state else None


# The recurrent form, differentiable: the chunkwise kernels compute the same recurrence, faster than token by token.
recurrent = functools.partial(chunkwise, chunk_size=MAX_CHUNK)
