"""gate(g) ⊙ GroupNorm(o), fused for training: one autograd node that stores what its backward needs.

The unfused ops store, per token, the norm's input, its normalized output, the gate's output and the
product's other factor: four (H * Dv)-wide tensors per layer. This function stores the normalized output
x̂, 1/std and the gate input g (a product of its own, see ``MultiScaleRetention.forward``), and recomputes
the rest in its backward pass. The layer uses it while gradients are recorded; the tests compare it with the
unfused ops.

The forward runs with autocast off, in the dtypes it is given: CUDA autocast runs ``native_layer_norm`` in
float32, which would store x̂ in float32 (twice the bytes of a bf16 o). The backward casts the gradient of x̂,
which has the gate's dtype, to x̂'s: the fused LayerNorm backward refuses a mix (x̂ float32 beside a bf16 gate
was the crash of training under CUDA autocast).

Both passes are chains of element-wise ops and row reductions, bound by memory traffic: eagerly, each op
reads and writes a (B, T, H * Dv) tensor. On the CPU, large inputs run them through ``torch.compile``
(inductor's C++ loops), which fuses each pass into one or two sweeps over memory (measured in
docs/benchmarks.md). The first call
compiles (seconds, cached on disk by inductor); where compiling fails (no C++ compiler) the eager ops run,
after one warning. ``RETENTIVE_COMPILE_NORM=0`` turns it off, ``=1`` compiles at any size.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops.torch_backend import without_autocast

# gate name -> (activation, its backward: (grad_out, input) -> grad_in)
FUSED_GATES = {
    "swish": (F.silu, torch.ops.aten.silu_backward),
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu": (F.gelu, torch.ops.aten.gelu_backward),
}
COMPILE_MIN_NUMEL = 1 << 20  # o's elements from which compiling pays: below, the eager ops run from cache


def gated_norm_forward(
    o: Tensor, g: Tensor, weight: Tensor | None, bias: Tensor | None, gate: str, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """out = act(g) ⊙ (x̂ w + b): o (B, H, T, Dv), g (B, T, H * Dv) -> out (B, T, H * Dv), x̂ (B, T, H, Dv),
    rstd (B, T, H, 1)."""
    x_hat, _, rstd = torch.native_layer_norm(o.transpose(1, 2), o.shape[-1:], None, None, eps)  # (B, T, H, Dv)
    y = x_hat.flatten(-2)  # (B, T, H * Dv)
    if weight is not None:
        y = torch.addcmul(bias, y, weight)
    out = FUSED_GATES[gate][0](g)
    # in place saves eager a (B, T, H * Dv) temporary; traced, it is left to the compiler, and must be: torch 2.11's
    # torch.compile gave this function zero gradients when its output was written in place
    in_place = out.dtype == y.dtype and not torch.compiler.is_compiling()
    return (out.mul_(y) if in_place else out * y), x_hat, rstd


def gated_norm_backward(
    dout: Tensor, x_hat: Tensor, rstd: Tensor, g: Tensor, weight: Tensor | None, bias: Tensor | None, gate: str
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients of o (B, H, T, Dv) (contiguous: the chunkwise backward wants it head-major), g, w, b."""
    # eagerly, each (B, T, H * Dv) temporary is updated in place: fresh ones would each pay their page faults
    act, act_backward = FUSED_GATES[gate]
    x_flat = x_hat.flatten(-2)  # (B, T, H * Dv)
    dout_y = dout * x_flat if weight is None else torch.addcmul(bias, x_flat, weight).mul_(dout)
    dg = act_backward(dout_y, g).to(g.dtype)
    dy = act(g).mul_(dout)  # (B, T, H * Dv)
    dweight = dbias = None
    if weight is not None:
        dweight = torch.mul(dy, x_flat, out=dout_y).sum((0, 1)).to(weight.dtype)
        dbias = dy.sum((0, 1)).to(bias.dtype)
        dy.mul_(weight)
    # dy has the gate's dtype, x̂ the norm's: the fused LayerNorm backward wants x̂'s
    do = _layer_norm_backward(dy.view_as(x_hat).to(x_hat.dtype), x_hat, rstd)  # (B, T, H, Dv)
    return do.transpose(1, 2).contiguous(), dg, dweight, dbias


def _layer_norm_backward(dx_hat: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    """d input of x̂ = (x - mean) * rstd, from x̂ itself: rstd * (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂)).

    The bracket is what the fused LayerNorm backward returns for an input that is already normalized
    (mean 0, rstd 1), so it is one kernel, then one product.
    """
    zero, one = torch.zeros_like(rstd), torch.ones_like(rstd)
    bracket = torch.ops.aten.native_layer_norm_backward(
        dx_hat, x_hat, x_hat.shape[-1:], zero, one, None, None, [True, False, False]
    )[0]
    return bracket.mul_(rstd)


class GatedHeadNorm(torch.autograd.Function):
    """out = act(g) ⊙ (x̂ w + b), x̂ = LayerNorm of each head of o without affine (w, b None: no affine)."""

    @staticmethod
    @without_autocast
    def forward(ctx, o, g, weight, bias, gate, eps, compile):
        out, x_hat, rstd = _run(gated_norm_forward, compile, o, g, weight, bias, gate, eps)
        ctx.gate, ctx.o_dtype, ctx.compile = gate, o.dtype, compile
        ctx.save_for_backward(x_hat, rstd, g, weight, bias)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x_hat, rstd, g, weight, bias = ctx.saved_tensors
        do, dg, dweight, dbias = _run(gated_norm_backward, ctx.compile, dout, x_hat, rstd, g, weight, bias, ctx.gate)
        return do.to(ctx.o_dtype), dg, dweight, dbias, None, None, None


def gated_head_norm(
    o: Tensor,
    g: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    gate: str,
    eps: float,
    *,
    compile: bool | None = None,
) -> Tensor:
    """act(g) ⊙ (LayerNorm_per_head(o) w + b): o (B, H, T, Dv), g (B, T, H * Dv) -> (B, T, H * Dv).

    ``compile``: run both passes through ``torch.compile``; None decides (CPU tensors of at least
    ``COMPILE_MIN_NUMEL`` elements, unless ``RETENTIVE_COMPILE_NORM`` says otherwise).
    """
    if compile is None:
        compile = _compile_by_default(o)
    return GatedHeadNorm.apply(o, g, weight, bias, gate, eps, compile)


def _compile_by_default(o: Tensor) -> bool:
    setting = os.environ.get("RETENTIVE_COMPILE_NORM", "")
    if setting not in ("", "0", "1"):
        raise ValueError(f"RETENTIVE_COMPILE_NORM must be 0, 1 or unset, got {setting!r}")
    if setting:
        return setting == "1"
    return o.device.type == "cpu" and o.numel() >= COMPILE_MIN_NUMEL


_compile_failed = False  # set by the first failure: the compiler is not tried again in this process


def _run(fn: Callable, compile: bool, *args):
    """fn(*args), compiled when asked and possible: inside a model being compiled it is traced as it is."""
    global _compile_failed
    if not compile or _compile_failed or torch.compiler.is_compiling():
        return fn(*args)
    try:
        return _compiled(fn)(*args)
    except Exception as error:  # whatever stops the compiler, the eager ops give the same result
        _compile_failed = True
        warnings.warn(f"gated norm: torch.compile failed ({error!r:.300}); running the eager ops", stacklevel=3)
        return fn(*args)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn)
