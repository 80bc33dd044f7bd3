"""gate(g) ⊙ GroupNorm(o), fused for training: one autograd node that stores what its backward needs.

The unfused ops store, per token, the norm's input, its normalized output, the gate's output and the
product's other factor: four (H * Dv)-wide tensors per layer. This function stores the normalized output
x̂, 1/std and the gate input g (a product of its own, see ``MultiScaleRetention.forward``), and recomputes
the rest in its backward pass. The layer uses it while gradients are recorded; the tests compare it with the
unfused ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# gate name -> (activation, its backward: (grad_out, input) -> grad_in)
FUSED_GATES = {
    "swish": (F.silu, torch.ops.aten.silu_backward),
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu": (F.gelu, torch.ops.aten.gelu_backward),
}


class GatedHeadNorm(torch.autograd.Function):
    """out = act(g) ⊙ (x̂ w + b), x̂ = LayerNorm of each head of o without affine (w, b None: no affine)."""

    @staticmethod
    def forward(ctx, o, g, weight, bias, gate, eps):
        x_hat, _, rstd = torch.native_layer_norm(o.transpose(1, 2), o.shape[-1:], None, None, eps)  # (B, T, H, Dv)
        y = x_hat.flatten(-2)  # (B, T, H * Dv)
        if weight is not None:
            y = torch.addcmul(bias, y, weight)
        ctx.gate, ctx.o_dtype = gate, o.dtype
        ctx.save_for_backward(x_hat, rstd, g, weight, bias)
        out = FUSED_GATES[gate][0](g)
        return out.mul_(y) if out.dtype == y.dtype else out * y

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        # each (B, T, H * Dv) temporary is updated in place: fresh ones would each pay their page faults
        x_hat, rstd, g, weight, bias = ctx.saved_tensors
        act, act_backward = FUSED_GATES[ctx.gate]
        x_flat = x_hat.flatten(-2)  # (B, T, H * Dv)
        dout_y = dout * x_flat if weight is None else torch.addcmul(bias, x_flat, weight).mul_(dout)
        dg = act_backward(dout_y, g).to(g.dtype)
        dy = act(g).mul_(dout)  # (B, T, H * Dv)
        dweight = dbias = None
        if weight is not None:
            dweight = torch.mul(dy, x_flat, out=dout_y).sum((0, 1)).to(weight.dtype)
            dbias = dy.sum((0, 1)).to(bias.dtype)
            dy.mul_(weight)
        do = _layer_norm_backward(dy.view_as(x_hat), x_hat, rstd).transpose(1, 2)  # (B, H, T, Dv)
        return do.to(ctx.o_dtype), dg, dweight, dbias, None, None


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


def gated_head_norm(o: Tensor, g: Tensor, weight: Tensor | None, bias: Tensor | None, gate: str, eps: float) -> Tensor:
    """act(g) ⊙ (LayerNorm_per_head(o) w + b): o (B, H, T, Dv), g (B, T, H * Dv) -> (B, T, H * Dv)."""
    return GatedHeadNorm.apply(o, g, weight, bias, gate, eps)
