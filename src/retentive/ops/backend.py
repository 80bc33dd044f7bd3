"""What a retention backend computes, stated once: :class:`RetentionBackend`, its return :class:`Pieces`, and the
chunk driver the PyTorch forms share (:func:`chunkwise_from`).

A backend computes the *unnormalized* pieces, so that :func:`retentive.ops.retention` applies the normalizations
once, the same way for every backend (docs/math.md, Normalizations):

    o_n = sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m      (numerator, (B, H, T, Dv))
    r_n = sum_{m<=n} gamma^(n-m) (q_n . k_m)          (row sum, (B, H, T), = q_n . z_n)

plus the state after the last token (S, z). Two backends keep the contract: :mod:`.torch_backend` (plain PyTorch)
and :mod:`.triton` (fused kernels); :mod:`.reference` is the oracle both are tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .state import RetentionState


class Pieces(NamedTuple):
    o: Tensor  # (B, H, T, Dv) unnormalized output
    r: Tensor | None  # (B, H, T) row sums q_n . z_n, when asked for
    S: Tensor  # (B, H, Dk, Dv) final state
    z: Tensor  # (B, H, Dk) final key sum


class RetentionBackend(Protocol):
    """The forms of retention a backend provides (a module: :mod:`.torch_backend`, :mod:`.triton`).

    Common arguments: q, k (B, H, T, Dk) rotated; v (B, H, T, Dv), one dtype; log_g (H,) log gamma in the
    state's dtype; S (B, H, Dk, Dv) and z (B, H, Dk) the incoming state, or both None to start from zeros;
    ``starts`` (B, T) bool, True on the first token of each packed document (docs/math.md, Packed documents): no
    token reads a token, or the incoming state, from before the start of its document. None: one document.
    """

    def chunkwise(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_g: Tensor,
        S: Tensor | None,
        z: Tensor | None,
        *,
        chunk_size: int,
        with_rowsum: bool,
        scale: float = 1.0,
        starts: Tensor | None = None,
    ) -> Pieces:
        """Chunks of ``chunk_size`` tokens (>= 1, need not divide T); the parallel form is chunk_size >= T.

        ``scale`` multiplies every q . k; ``with_rowsum`` asks for r. Returns Pieces: o (B, H, T, Dv),
        r (B, H, T) or None, S and z after the last token.
        """
        ...

    def recurrent(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_g: Tensor,
        S: Tensor | None,
        z: Tensor | None,
        *,
        with_rowsum: bool,
        scale: float = 1.0,
        starts: Tensor | None = None,
    ) -> Pieces:
        """The recurrence S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n, z_n = gamma z_{n-1} + k_n, r_n = q_n . z_n,
        differentiable; arguments and return as :meth:`chunkwise`."""
        ...

    def decode_step(
        self,
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
        """One token of every head without gradients, normalizations included: what decoding runs per token.

        q, k (B, H, 1, Dk) unscaled; v (B, H, 1, Dv); ``state`` from the previous token or None, left as it is
        unless ``overwrite``: then the new S and z may be written over the given ones (where their dtype and layout
        allow; the offset is always a new tensor), which a decoding step whose old state nobody reads again asks for
        (it halves the state's memory and allocates nothing). Returns o (B, H, 1, Dv) in v's dtype and the new state
        (None unless ``output_state``).
        """
        ...


def chunkwise_from(pieces: Callable[..., tuple]) -> Callable[..., Pieces]:
    """:meth:`RetentionBackend.chunkwise` from ``pieces``, which computes N equal chunks at once.

    ``pieces(q, k, v, log_g, S, z, with_rowsum, scale, starts)`` takes q, k (B, H, N, C, Dk), v (B, H, N, C, Dv),
    starts (B, N, C) or None, and returns (o (B, H, N, C, Dv), r (B, H, N, C) or None, S, z): the PyTorch forms,
    with autograd or a hand-written backward. The chunkwise form runs the full chunks in one call, then the shorter
    last one (no padding), the state carried from one to the other.
    """

    def chunkwise(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_g: Tensor,
        S: Tensor | None,
        z: Tensor | None,
        *,
        chunk_size: int,
        with_rowsum: bool,
        scale: float = 1.0,
        starts: Tensor | None = None,
    ) -> Pieces:
        """See :meth:`RetentionBackend.chunkwise`."""
        T = q.shape[-2]
        C = min(chunk_size, T)
        full = T - T % C
        outs = []
        for start, end, n in ((0, full, full // C), (full, T, 1)):  # the full chunks, then the short one
            if end == start:
                continue
            q_, k_, v_ = (x[:, :, start:end].unflatten(2, (n, -1)) for x in (q, k, v))  # (B, H, n, C', D)
            starts_ = None if starts is None else starts[:, start:end].unflatten(1, (n, -1))  # (B, n, C')
            p = Pieces(*pieces(q_, k_, v_, log_g, S, z, with_rowsum, scale, starts_))
            S, z = p.S, p.z
            outs.append(p)
        o = _concat_time([p.o.flatten(2, 3) for p in outs])
        r = _concat_time([p.r.flatten(2, 3) for p in outs]) if with_rowsum else None
        return Pieces(o, r, S, z)

    return chunkwise


def _concat_time(pieces: list[Tensor]) -> Tensor:
    """Concatenate along time (dim 2), without a copy when there is one piece (the parallel form)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
