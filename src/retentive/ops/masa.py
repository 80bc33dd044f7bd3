"""Manhattan self-attention of RMT, whole (MaSA) and decomposed (MaSAD), as pure functions.

MaSA:  O = softmax(Q K^T * scale + log D) V with log D the 2-D Manhattan log-decay of the grid.
MaSAD: along each row first, V' = softmax(Q K^T * scale + ln(gamma) |Δx|) V, then along each column,
       O = softmax(Q K^T * scale + ln(gamma) |Δy|) V'. It costs O(HW (H + W) d) instead of O((HW)^2 d).
The two agree exactly when every logit Q K^T is equal (e.g. W_Q = 0): the softmax of a Kronecker sum
then factorizes into a row softmax times a column softmax. They differ in general.
"""

from __future__ import annotations

from torch import Tensor

from .decay2d import log_decay_1d, manhattan_log_decay


def _check(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, height: int, width: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be (batch, heads, height * width, Dk) and v (batch, heads, height * width, Dv), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != height * width:
        raise ValueError(f"the grid {height} x {width} holds {height * width} tokens but q has {q.shape[2]}")
    if log_gamma.shape != (q.shape[1],):
        raise ValueError(f"log_gamma must have one entry per head, ({q.shape[1]},), got {tuple(log_gamma.shape)}")


def manhattan_attention(
    q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, height: int, width: int, scale: float | None = None
) -> Tensor:
    """MaSA: softmax attention over the whole grid with the 2-D Manhattan log-decay added to the logits.

    Args:
        q, k: (B, H, N, Dk), N = height * width tokens in raster order, already rotated.
        v: (B, H, N, Dv).
        log_gamma: (H,) per-head ln(gamma), see :func:`retentive.ops.decay2d.rmt_log_gamma`.
        height, width: the grid.
        scale: multiplies Q K^T; defaults to Dk^-1/2.
    Returns:
        (B, H, N, Dv)
    """
    _check(q, k, v, log_gamma, height, width)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = manhattan_log_decay(log_gamma.to(q.device, q.dtype), height, width)  # (H, N, N)
    logits = (q * scale) @ k.transpose(-1, -2) + mask  # (B, H, N, N)
    return logits.softmax(-1) @ v


def decomposed_manhattan_attention(
    q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, height: int, width: int, scale: float | None = None
) -> Tensor:
    """MaSAD: softmax attention along each row with ln(gamma)|Δx|, then along each column with ln(gamma)|Δy|.

    Args and Returns as :func:`manhattan_attention`.
    """
    _check(q, k, v, log_gamma, height, width)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    log_gamma = log_gamma.to(q.device, q.dtype)
    q = (q * scale).unflatten(2, (height, width))  # (B, H, h, w, Dk)
    k = k.unflatten(2, (height, width))  # (B, H, h, w, Dk)
    v = v.unflatten(2, (height, width))  # (B, H, h, w, Dv)

    # 1. along each row: tokens of row y attend to row y, decayed by |Δx|
    rows = q @ k.transpose(-1, -2) + log_decay_1d(log_gamma, width)[:, None]  # (B, H, h, w, w)
    v = rows.softmax(-1) @ v  # (B, H, h, w, Dv)

    # 2. along each column: tokens of column x attend to column x, decayed by |Δy|
    q, k, v = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)  # (B, H, w, h, D)
    cols = q @ k.transpose(-1, -2) + log_decay_1d(log_gamma, height)[:, None]  # (B, H, w, h, h)
    o = cols.softmax(-1) @ v  # (B, H, w, h, Dv)
    return o.transpose(2, 3).flatten(2, 3)  # (B, H, N, Dv)
