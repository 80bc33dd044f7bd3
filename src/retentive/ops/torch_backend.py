"""The PyTorch backend (``backend="torch"``): every form of :class:`~retentive.ops.backend.RetentionBackend` in plain
PyTorch, the chunkwise one with a hand-written backward.

Autograd through the chunkwise form (:func:`retentive.ops.reference.chunk_pieces`) keeps every intermediate of every
chunk: the C x C scores, the decayed keys and queries, ... (about 4x the inputs at C = 256).
:class:`TorchChunkRetention` keeps only q, k, v and the state entering each chunk, and recomputes the scores in the
backward pass, which is the forward pass run backwards (docs/math.md, Retention, one head): with
A = (Q K^T) ⊙ D inside a chunk and G_n the gradient of the state after chunk n, scanned from the last chunk to the
first (G_(n-1) = gamma^C G_n + (Q_n ⊙ g_in)^T dO_n),

    dA = (dO V^T + dr 1^T) ⊙ D
    dQ = dA K + (dO S_in^T + dr z_in^T) ⊙ g_in
    dK = dA^T Q + (V G_n^T + 1 Gz_n^T) ⊙ g_out
    dV = A^T dO + (K ⊙ g_out) G_n

Every form runs with autocast off (:func:`without_autocast`): the backend chooses its own dtypes.

The tests compare outputs and gradients with autograd through :func:`retentive.ops.reference.chunkwise`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .backend import Pieces, chunkwise_from
from .decay import ChunkDecay, chunk_decay, decay_sum, split_documents
from .state import RetentionState

__all__ = ["chunkwise", "decode_step", "recurrent"]

P, R = ParamSpec("P"), TypeVar("R")


def without_autocast(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` with autocast off on the device of its first tensor argument.

    The forms compute in the dtypes they are given (:func:`~retentive.ops.retention` casts half-precision inputs
    to float32 once): autocast would make some products bf16 beside float32 states, which the in-place updates
    refuse (``baddbmm_``) and which would round what the backend keeps in float32. So under autocast they compute
    what they compute on inputs of the same dtypes without it; checked first, as decoding calls this per token.
    Autocast has no state for meta tensors (a model traced for its shapes), where asking raises; the question is
    asked of ``torch.is_autocast_enabled`` alone, which ``torch.compile`` traces (torch 2.11's cannot trace
    ``torch.amp.is_autocast_available``).
    """

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        device = next(a for a in args if isinstance(a, Tensor)).device.type
        if device == "meta" or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run


def scan_states(x: Tensor, s: Tensor, g: Tensor, *, reverse: bool = False) -> tuple[Tensor, Tensor]:
    """s_(n+1) = g_n s_n + x_n from s_0 = ``s``: the states entering each step (B, H, N, ...) and the one after
    the last; ``reverse`` runs from n = N-1 down to 0. :func:`~retentive.ops.reference.scan_chunks` without
    autograd: each state is written in place into one buffer (no list to stack), and the backward scan needs no
    flips.
    Args: x (B, H, N, *F); s (B, H, *F); g the decay across each step, broadcastable to (B, H, N).
    """
    g = g.expand(x.shape[:3])[(...,) + (None,) * (x.dim() - 3)]  # (B, H, N, 1, ...): broadcasts over F
    states = torch.empty_like(x)
    order = range(x.shape[2] - 1, -1, -1) if reverse else range(x.shape[2])
    states[:, :, order[0]] = s
    for n, after in itertools.pairwise(order):
        torch.addcmul(x[:, :, n], g[:, :, n], states[:, :, n], out=states[:, :, after])
    return states, torch.addcmul(x[:, :, order[-1]], g[:, :, order[-1]], states[:, :, order[-1]])


def _add_product(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """out += a @ b in place, batched over the leading dims (``view`` refuses an ``out`` that would copy)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out


class TorchChunkRetention(torch.autograd.Function):
    """:func:`~retentive.ops.reference.chunk_pieces` (N equal chunks) with the backward above.

    Both passes update in place what the reference writes anew (no autograd to serve here): each (N, C, D)
    temporary would be a fresh 8-16 MiB buffer at 8k tokens, paying its page faults anew on every call.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, q, k, v, log_g, S, z, with_rowsum, scale, starts):
        # every product below is batched over (B, H, N): with each head's rows contiguous it runs on views; the
        # projections hand over token-major views, which matmul would copy again at each of the ten products
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, _, C, Dk = q.shape
        decay = _decay(log_g, C, scale, starts)

        A = (q @ k.transpose(-1, -2)).mul_(decay.D)  # (B, H, N, C, C): inside each chunk, the parallel form
        o = A @ v  # (B, H, N, C, Dv)
        r = A.sum(-1) if with_rowsum else None  # (B, H, N, C)
        del A

        k_out = k * decay.g_out  # (B, H, N, C, Dk): each token decayed to its chunk's end
        S = q.new_zeros(B, H, Dk, v.shape[-1]) if S is None else S
        z = q.new_zeros(B, H, Dk) if z is None else z
        S_in, S = scan_states(k_out.transpose(-1, -2) @ v, S, decay.g_chunk)  # (B, H, N, Dk, Dv)
        z_in, z = scan_states(k_out.sum(-2), z, decay.g_chunk)  # (B, H, N, Dk)
        del k_out

        q_in = q * decay.g_in  # (B, H, N, C, Dk): across chunks, what the state brings to each token
        _add_product(o, q_in, S_in)
        if with_rowsum:
            _add_product(r[..., None], q_in, z_in[..., None])
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, log_g, S_in, z_in, starts)
        return o, r, S, z

    @staticmethod
    @once_differentiable
    @without_autocast  # a backward called inside an autocast region would run under it
    def backward(ctx, do, dr, dS, dz):
        q, k, v, log_g, S_in, z_in, starts = ctx.saved_tensors
        do = do.contiguous()  # the gradient arrives token-major too
        decay = _decay(log_g, q.shape[-2], ctx.scale, starts)
        with_z = dr is not None or dz is not None  # else z_in and the gradient of z play no part

        # inside each chunk, one C x C matrix alive at a time: they are the largest tensors here
        A = (q @ k.transpose(-1, -2)).mul_(decay.D)  # (B, H, N, C, C)
        dv = A.transpose(-1, -2) @ do
        del A
        dA = do @ v.transpose(-1, -2)
        if dr is not None:
            dA.add_(dr[..., None])
        dA.mul_(decay.D)
        dq = dA @ k
        dk = dA.transpose(-1, -2) @ q
        del dA

        # across chunks: the gradient of the state after each chunk, scanned from the last chunk to the first
        q_in = q * decay.g_in  # (B, H, N, C, Dk)
        dS_in = q_in.transpose(-1, -2) @ do  # (B, H, N, Dk, Dv): what chunk n's tokens ask of S_in
        G = torch.zeros_like(S_in[:, :, 0]) if dS is None else dS
        G_out, dS0 = scan_states(dS_in, G, decay.g_chunk, reverse=True)  # (B, H, N, Dk, Dv)
        del dS_in
        Gz_out = dz0 = None
        if with_z:
            dz_in = (q_in * dr[..., None]).sum(-2) if dr is not None else torch.zeros_like(z_in)  # (B, H, N, Dk)
            Gz = torch.zeros_like(z_in[:, :, 0]) if dz is None else dz
            Gz_out, dz0 = scan_states(dz_in, Gz, decay.g_chunk, reverse=True)  # (B, H, N, Dk)
        del q_in

        cross_q = do @ S_in.transpose(-1, -2)  # (B, H, N, C, Dk)
        if dr is not None:
            cross_q.addcmul_(dr[..., None], z_in[:, :, :, None])
        dq.addcmul_(cross_q, decay.g_in)
        del cross_q
        cross_k = v @ G_out.transpose(-1, -2)  # (B, H, N, C, Dk)
        if with_z:
            cross_k.add_(Gz_out[:, :, :, None])
        dk.addcmul_(cross_k, decay.g_out)
        del cross_k
        _add_product(dv, k * decay.g_out, G_out)
        needs = ctx.needs_input_grad
        return dq, dk, dv, None, dS0 if needs[4] else None, dz0 if needs[5] else None, None, None, None


def _decay(log_g: Tensor, C: int, scale: float, starts: Tensor | None) -> ChunkDecay:
    """The chunk's decay factors, split at the documents' starts (B, N, C) where there are any."""
    decay = chunk_decay(log_g, C, scale)  # D and g_in carry the scale
    return decay if starts is None else split_documents(decay, starts)


chunkwise = chunkwise_from(TorchChunkRetention.apply)  # its backward keeps only q, k, v and the chunk states


@without_autocast
def recurrent(
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
    """See :meth:`~retentive.ops.backend.RetentionBackend.recurrent`: one token at a time, through autograd."""
    q = q * scale
    B, H, T, Dk = q.shape
    gamma = log_g.exp()[:, None].expand(B, H, T)  # (B, H, T): the decay before each token
    if starts is not None:  # a document's first token reads nothing of the state
        gamma = gamma * ~starts[:, None]
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if S is None else S
    z = q.new_zeros(B, H, Dk) if z is None else z
    outs, rows = [], []
    for q_t, k_t, v_t, g_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), gamma.unbind(2), strict=True):
        S = g_t[..., None, None] * S + k_t[..., :, None] * v_t[..., None, :]  # (B, H, Dk, Dv)
        z = g_t[..., None] * z + k_t
        outs.append((q_t[..., None, :] @ S).squeeze(-2))  # (B, H, Dv)
        if with_rowsum:
            rows.append((q_t * z).sum(-1))  # (B, H)
    o = torch.stack(outs, dim=2)
    r = torch.stack(rows, dim=2) if with_rowsum else None
    return Pieces(o, r, S, z)


@without_autocast
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
    """See :meth:`~retentive.ops.backend.RetentionBackend.decode_step`: the recurrent form unrolled once, in as few
    tensor ops as the math allows (decoding runs it for every token and layer). With ``overwrite``, the updates of
    S and z write their results over the given tensors where these already have the state's dtype."""
    out_dtype, dtype = v.dtype, log_g.dtype
    if q.dtype != dtype:  # half precision: state and sums in float32 (tested first: even a no-op cast costs a dispatch)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kv = k.transpose(-1, -2) * v  # (B, H, Dk, Dv): k_n^T v_n
    if state is None:
        S, z, offset = kv, k[:, :, 0], torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    else:
        S, z, offset = state.S, state.z, state.offset
        in_place = overwrite and S.dtype == dtype and z.dtype == dtype
        if S.dtype != dtype:
            S, z = S.to(dtype), z.to(dtype)
        gamma = log_g.exp()[:, None]  # (H, 1)
        S = torch.addcmul(kv, gamma[..., None], S, out=S if in_place else None)  # gamma S + k^T v
        z = torch.addcmul(k[:, :, 0], gamma, z, out=z if in_place else None)  # (B, H, Dk)
    o = (q @ S) * scale  # (B, H, 1, Dv)
    if normalize_decay or normalize_retention:
        r = (q[:, :, 0] * z).sum(-1)[..., None, None] * scale if normalize_retention else None  # (B, H, 1, 1)
        if normalize_decay:
            c_sqrt = decay_sum(log_g, offset[:, None]).sqrt()[..., None]  # (B, H, 1, 1)
            o = o / c_sqrt
            r = r / c_sqrt if normalize_retention else None
        if normalize_retention:
            o = o / r.abs().clamp(min=1)
    new_state = RetentionState(S, z, offset + 1) if output_state else None
    return (o if o.dtype == out_dtype else o.to(out_dtype)), new_state
