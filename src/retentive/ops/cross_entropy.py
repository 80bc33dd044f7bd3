"""Cross-entropy of a linear layer's logits, a block of rows at a time: the (N, V) logits never exist whole.

A language model's output layer and loss are, at 8k tokens and a 4k vocabulary, four (N, V) float32
tensors of 128 MiB each (logits, log-probabilities, their gradient, the gradient of the shifted slice),
every one written and read from memory. Here each block of rows goes logits -> log-softmax -> loss and,
when gradients are wanted, on at once to the gradient of the logits, softmax - onehot, and through the two
products of the layer's backward pass; only dL/dhidden (N, d) and dL/dweight (V, d) are kept. That is the
same arithmetic as autograd through ``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` (the
reference the tests hold it to), with a block of logits, not four whole ones, passing through memory.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["linear_cross_entropy"]

# Logits per block, by device. On a CPU, 2M (8 MiB in float32) stay in its caches. On a GPU every block reads the
# (V, d) weight twice and its float32 gradient once, and writes that gradient: at 8k tokens and a 100k vocabulary,
# 20-row blocks move about 1.3 TB (463 ms of a 648 ms retnet-1.3b training step on an H200, docs/gpu.md);
# 1,300-row blocks move 2% of it.
BLOCK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 27}


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, the mean or the sum over the rows not
    ignored; the gradients are made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, block_size, reduction):
        valid = targets != ignore_index  # (N,)
        safe = torch.where(valid, targets, 0)[:, None]  # (N, 1): any class for ignored rows, zeroed below
        needs = ctx.needs_input_grad
        # sums over rows; backward scales them by grad_loss / divisor (the count for a mean, 1 for a sum). Softmax
        # and sums in at least float32
        acc = torch.promote_types(hidden.dtype, torch.float32)
        dh = torch.empty_like(hidden) if needs[0] else None
        dw = torch.zeros_like(weight, dtype=acc) if needs[1] else None
        db = torch.zeros_like(bias, dtype=acc) if bias is not None and needs[2] else None
        total = hidden.new_zeros((), dtype=acc)
        # two buffers for every block: fresh 16 MiB tensors per block would each pay their page faults again
        n = min(block_size, hidden.shape[0])
        logits_buffer, logp_buffer = (
            hidden.new_empty(n, weight.shape[0]),
            hidden.new_empty(n, weight.shape[0], dtype=acc),
        )
        for start in range(0, hidden.shape[0], block_size):
            rows = slice(start, start + block_size)
            h = hidden[rows]  # (n, d)
            logits = logits_buffer[: h.shape[0]]  # (n, V)
            torch.mm(h, weight.T, out=logits) if bias is None else torch.addmm(bias, h, weight.T, out=logits)
            logp = torch.log_softmax(logits, dim=-1, dtype=acc, out=logp_buffer[: h.shape[0]])
            nll = -logp.gather(1, safe[rows]).squeeze(1)  # (n,)
            total += torch.where(valid[rows], nll, 0).sum()
            if dh is None and dw is None and db is None:  # no gradient wanted: the loss alone
                continue
            p = logp.exp_()  # softmax, in place of the log-probabilities
            p.scatter_add_(1, safe[rows], p.new_full((p.shape[0], 1), -1.0))  # dloss/dlogits = softmax - onehot
            p.mul_(valid[rows, None])  # always: a language model's last position is ignored, and no branch on data
            if p.dtype != hidden.dtype:  # half precision: the products run in the model's dtype
                p = logits.copy_(p)
            if dh is not None:
                torch.mm(p, weight, out=dh[rows])
            if dw is not None:
                dw.addmm_(p.T, h) if dw.dtype == p.dtype else dw.add_(p.T @ h)
            if db is not None:
                db += p.sum(0, dtype=acc)
        divisor = valid.sum() if reduction == "mean" else total.new_ones(())
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.save_for_backward(dh, dw, db, divisor)
        return total / divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        *sums, divisor = ctx.saved_tensors
        scale = grad_loss / divisor
        dh, dw, db = (None if g is None else (g * scale).to(dtype) for g, dtype in zip(sums, ctx.dtypes, strict=True))
        return dh, dw, db, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    block_size: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=ignore_index, reduction=reduction)``,
    in float32 or wider, without the (N, V) logits: memory O(block_size * V) instead of O(N * V).

    Args:
        hidden: (N, d); weight: (V, d); bias: (V,) or None; targets: (N,) class indices, ``ignore_index`` skipped.
        block_size: rows per block; by default about 2M logits (8 MiB in float32) per block on a CPU, 128M on a GPU.
        reduction: ``"mean"`` over the rows not ignored (NaN if every row is ignored, as ``F.cross_entropy``) or
            their ``"sum"`` (0 if every row is ignored).
    Returns the loss, a scalar.
    While gradients are recorded, the forward pass also computes them (saving dL/dhidden and dL/dweight,
    not activations): calling it without a backward pass to follow costs the backward's products.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, d) and weight (V, d) with the same d, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(
            f"targets must be int64 of shape ({hidden.shape[0]},), got {targets.dtype} {tuple(targets.shape)}"
        )
    if block_size is None:
        block_size = max(1, BLOCK_ELEMENTS.get(hidden.device.type, BLOCK_ELEMENTS["cuda"]) // weight.shape[0])
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, block_size, reduction)
