"""Convolutional pieces of RMT on channels-last grids (B, height, width, C): depthwise conv (CPE, LCE),
the convolutional FFN, the stem and patch merging."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DepthwiseConv2d(nn.Module):
    """A depthwise k x k convolution, stride 1, "same" padding, on a channels-last grid.

    Used as CPE (3 x 3, a residual at the start of each block), LCE (5 x 5 on V) and in the conv FFN.
    """

    def __init__(
        self, dim: int, kernel_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (same padding), got {kernel_size}")
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, height, width, C) -> (B, height, width, C)."""
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvFeedForward(nn.Module):
    """RMT's FFN: h = gelu(x W1); h = h + DWConv3x3(h); y = h W2.

    Args:
        dim: C.
        hidden_dim: width of h (the config's ffn_ratio * C).
    """

    def __init__(
        self, dim: int, hidden_dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **kw)
        self.dwconv = DepthwiseConv2d(hidden_dim, 3, **kw)
        self.fc2 = nn.Linear(hidden_dim, dim, **kw)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, height, width, C) -> (B, height, width, C)."""
        h = F.gelu(self.fc1(x))  # (B, height, width, hidden)
        return self.fc2(h + self.dwconv(h))


def _conv_bn(cin: int, cout: int, stride: int, **kw) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, **kw), nn.BatchNorm2d(cout, **kw)]


class ConvStem(nn.Module):
    """Four 3 x 3 convolutions with BatchNorm (strides 2, 1, 2, 1): an image to a grid 4x smaller.

    Args:
        in_channels: image channels.
        dim: C of the first stage; the first two convolutions have C / 2 channels.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        half = dim // 2
        self.proj = nn.Sequential(
            *_conv_bn(in_channels, half, 2, **kw),
            nn.GELU(),
            *_conv_bn(half, half, 1, **kw),
            nn.GELU(),
            *_conv_bn(half, dim, 2, **kw),
            nn.GELU(),
            *_conv_bn(dim, dim, 1, **kw),
        )

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, in_channels, H, W) -> (B, ceil(H/4), ceil(W/4), C)."""
        return self.proj(images).permute(0, 2, 3, 1)


class PatchMerging(nn.Module):
    """Halve the grid and change the width: a 3 x 3 stride-2 convolution and BatchNorm."""

    def __init__(
        self, dim: int, out_dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1, device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(out_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, height, width, C) -> (B, ceil(height/2), ceil(width/2), out_dim)."""
        return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
