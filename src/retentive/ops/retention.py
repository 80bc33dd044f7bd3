"""``retention(q, k, v, decay, mode=...)``: the one entry point to the three forms (docs/math.md, One entry point,
three forms), and the one small dispatch to a :class:`~retentive.ops.backend.RetentionBackend`."""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
from torch import Tensor

from . import torch_backend
from .backend import Pieces, RetentionBackend
from .decay import DecaySpec, decay_sum, log_gamma_on
from .state import RetentionState, document_positions

Mode = Literal["parallel", "chunkwise", "recurrent"]
MODES = ("parallel", "chunkwise", "recurrent")
Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
CHUNK_SIZE = 64  # tokens per chunk of the chunkwise form, unless a caller says otherwise


def check_chunk_size(chunk_size: object, name: str = "chunk_size") -> int:
    """``chunk_size`` if it is an integer >= 1, else a ValueError naming ``name``."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {chunk_size!r}")
    return chunk_size


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: DecaySpec = "retnet",
    *,
    mode: Mode = "parallel",
    chunk_size: int = CHUNK_SIZE,
    state: RetentionState | None = None,
    causal: bool = True,
    scale: float | None = None,
    normalize_decay: bool = False,
    normalize_retention: bool = False,
    output_state: bool = False,
    starts: Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, RetentionState | None]:
    """Multi-scale retention of every head, in any of its three forms; they agree up to rounding.

    o_n = sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m, optionally normalized (docs/math.md, Normalizations):
    ``normalize_decay`` divides row n by sqrt(c_n), c_n = sum_{m<=n} gamma^(n-m);
    ``normalize_retention`` then divides it by max(|sum_m of its retention scores|, 1).

    Args:
        q, k: (B, H, T, Dk), already rotated (see :mod:`retentive.ops.rotary`).
        v: (B, H, T, Dv), same dtype as q and k.
        decay: a schedule (``"retnet"``, ``"linspace"``) or one gamma per head in (0, 1).
        mode: ``"parallel"`` (training), ``"chunkwise"`` (long sequences), ``"recurrent"`` (decoding).
        chunk_size: tokens per chunk in the chunkwise form, >= 1; need not divide T.
        state: what an earlier call returned, to continue a stream; None starts at position 0.
        causal: False gives bidirectional retention, D_nm = gamma^|n-m| (docs/math.md, Retention, one head); no state.
        scale: multiplies q . k; defaults to Dk^-1/2.
        output_state: also return the state after the last token.
        starts: (B, T) bool, True on the first token of each document packed into a row (docs/math.md, Packed
            documents): each document reads nothing from before its start, as if it were a row of its own (its
            positions count from 0 there), at the cost of one row of its length. Causal only.
        backend: ``"torch"`` (plain PyTorch, :mod:`.torch_backend`, with a hand-written chunkwise backward that
            stores only q, k, v and the chunk states), ``"triton"`` (fused kernels, CUDA tensors or
            TRITON_INTERPRET=1) or ``"auto"``: the kernels for CUDA tensors when triton imports, PyTorch elsewhere.
    Returns:
        o: (B, H, T, Dv) in the dtype of v.
        state: the new :class:`RetentionState` (S, z in float32, or float64 for float64 inputs), or None.
    """
    _check(q, k, v, mode, chunk_size, state, causal, starts)
    B, H, T, Dk = q.shape
    scale = Dk**-0.5 if scale is None else scale
    if starts is None and _is_decode_token(mode, causal, q, k, v, state):
        kw = dict(normalize_decay=normalize_decay, normalize_retention=normalize_retention, output_state=output_state)
        return decode_step(q, k, v, decay, state, scale=scale, backend=backend, **kw)
    forms = _forms(backend, q)
    out_dtype, dtype = v.dtype, torch.promote_types(q.dtype, torch.float32)  # half precision keeps sums in float32
    work = dtype if forms is torch_backend else q.dtype  # the kernels multiply half precision on the tensor cores
    log_g = log_gamma_on(decay, H, q.device, dtype)  # (H,)
    q, k, v = q.to(work), k.to(work), v.to(work)  # no copies when they are already there
    S, z = (None, None) if state is None else (state.S.to(dtype), state.z.to(dtype))
    offset = q.new_zeros(B, dtype=torch.long) if state is None else state.offset  # (B,)
    positions = None if starts is None else document_positions(starts, offset)  # (B, T) where documents restart

    def run(q: Tensor, k: Tensor, v: Tensor) -> Pieces:
        kw = dict(with_rowsum=normalize_retention, scale=scale, starts=starts)
        if mode == "recurrent":
            return forms.recurrent(q, k, v, log_g, S, z, **kw)
        return forms.chunkwise(q, k, v, log_g, S, z, chunk_size=T if mode == "parallel" else chunk_size, **kw)

    p = run(q, k, v)
    o, r, c = p.o, p.r, None
    if normalize_decay:
        at = offset[:, None] + torch.arange(T, device=q.device) if positions is None else positions  # (B, T)
        c = decay_sum(log_g, at)  # (B, H, T)
    if not causal:  # forward pass + backward pass - the diagonal counted twice
        back = run(q.flip(2), k.flip(2), v.flip(2))
        qk = (q * k).sum(-1) * scale  # (B, H, T)
        o = o + back.o.flip(2) - qk[..., None] * v
        r = r + back.r.flip(2) - qk if normalize_retention else None
        c = c + c.flip(2) - 1 if normalize_decay else None

    if normalize_decay:
        o = o / c.sqrt()[..., None]
        r = r / c.sqrt() if normalize_retention else None
    if normalize_retention:
        o = o / r.abs().clamp(min=1)[..., None]
    end = offset + T if positions is None else positions[:, -1] + 1  # the position after the last token
    new_state = RetentionState(p.S, p.z, end) if output_state and causal else None
    return o.to(out_dtype), new_state


def decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: DecaySpec,
    state: RetentionState | None,
    *,
    scale: float,
    normalize_decay: bool = False,
    normalize_retention: bool = False,
    output_state: bool = True,
    overwrite: bool = False,
    backend: Backend = "auto",
) -> tuple[Tensor, RetentionState | None]:
    """``retention(..., mode="recurrent")`` of one token without gradients, in the fewest ops: decoding.

    Unchecked (the caller is ``retention`` or a layer that built q, k, v itself). q, k: (B, H, 1, Dk) unscaled,
    v: (B, H, 1, Dv); ``state`` from the previous token or None; ``overwrite``: the new S and z may go over the
    given state's (see :meth:`~.backend.RetentionBackend.decode_step`). Returns o (B, H, 1, Dv) and the new state.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # the state's dtype, as in retention()
    return _forms(backend, q).decode_step(
        q,
        k,
        v,
        log_gamma_on(decay, q.shape[1], q.device, dtype),
        state,
        scale=scale,
        normalize_decay=normalize_decay,
        normalize_retention=normalize_retention,
        output_state=output_state,
        overwrite=overwrite,
    )


def _forms(backend: str, q: Tensor) -> RetentionBackend:
    """The backend that computes the unnormalized pieces: :mod:`.torch_backend` or the Triton kernels."""
    if backend == "auto" and not q.is_cuda:  # the common case first: decoding asks once per token and layer
        return torch_backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not (q.is_cuda and q.dtype != torch.float64 and _kernels())):
        return torch_backend
    if _kernels() is None:
        raise ImportError("backend='triton' needs the triton package (pip install triton), or use backend='torch'")
    return _kernels()


def _is_decode_token(mode: str, causal: bool, q: Tensor, k: Tensor, v: Tensor, state: RetentionState | None) -> bool:
    """One token of the causal recurrent form that no gradient flows through: :func:`retention` hands it to
    :func:`decode_step` (decoding), and this is the one place that decides so."""
    if mode != "recurrent" or q.shape[2] != 1 or not causal:
        return False
    tensors = (q, k, v) if state is None else (q, k, v, state.S, state.z)
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


@cache
def _kernels() -> RetentionBackend | None:
    try:
        from . import triton
    except ImportError:
        return None
    return triton


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mode: str,
    chunk_size: int,
    state: RetentionState | None,
    causal: bool,
    starts: Tensor | None,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, length, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them first")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in (batch, heads, length), got {tuple(v.shape[:3])} and {tuple(q.shape[:3])}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "chunkwise":
        check_chunk_size(chunk_size)
    if state is not None:
        if not causal:
            raise ValueError("bidirectional retention (causal=False) carries no state: pass state=None")
        state.check(q.shape[0], q.shape[1], q.shape[3], v.shape[3])
    if starts is not None:
        B, _, T, _ = q.shape
        if not isinstance(starts, Tensor) or starts.dtype != torch.bool or starts.shape != (B, T):
            got = f"{starts.dtype} {tuple(starts.shape)}" if isinstance(starts, Tensor) else type(starts).__name__
            raise ValueError(f"starts must be a (batch, length) = ({B}, {T}) bool tensor, got {got}")
        if not causal:
            raise ValueError("starts (packed documents) needs causal retention: pass causal=True or starts=None")
        if starts.device != q.device:
            raise ValueError(f"starts must be on q's device ({q.device}), got {starts.device}")
