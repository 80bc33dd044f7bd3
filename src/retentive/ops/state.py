"""The state a retention head carries between calls: (S, z, offset) (docs/math.md, One entry point, three forms)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RetentionState:
    """Recurrent state of retention for every head of one layer.

    Attributes:
        S: (B, H, Dk, Dv) the decayed sum of k_m^T v_m, float32 (float64 in the reference tests).
        z: (B, H, Dk) the decayed sum of keys, which makes the retention normalization exact.
        offset: (B,) int64 absolute position of the next token of each row. It is negative while a
            left-padded row still reads padding, so that its first real token sits at position 0.
    """

    S: Tensor
    z: Tensor
    offset: Tensor

    @classmethod
    def zeros(
        cls,
        batch_size: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        *,
        offset: Tensor | int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> RetentionState:
        """An empty state; ``offset`` may give each row its own starting position."""
        S = torch.zeros(batch_size, num_heads, key_dim, value_dim, device=device, dtype=dtype)
        z = torch.zeros(batch_size, num_heads, key_dim, device=device, dtype=dtype)
        offset = torch.as_tensor(offset, dtype=torch.long, device=device).expand(batch_size).clone()
        return cls(S, z, offset)

    def index_select(self, index: Tensor) -> RetentionState:
        """The state of the rows ``index`` (beam search reorders rows this way)."""
        index = index.to(self.S.device)
        return RetentionState(self.S[index], self.z[index], self.offset[index])

    def detach(self) -> RetentionState:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return RetentionState(self.S.detach(), self.z.detach(), self.offset)

    def nbytes(self) -> int:
        """Bytes held by this state; it does not depend on how many tokens were read."""
        return sum(t.numel() * t.element_size() for t in (self.S, self.z, self.offset))

    def check(self, batch_size: int, num_heads: int, key_dim: int, value_dim: int) -> None:
        """Raise ValueError if this state belongs to another configuration."""
        want = (batch_size, num_heads, key_dim, value_dim)
        if tuple(self.S.shape) != want or tuple(self.z.shape) != want[:3] or tuple(self.offset.shape) != want[:1]:
            raise ValueError(
                f"state has S {tuple(self.S.shape)}, z {tuple(self.z.shape)}, offset {tuple(self.offset.shape)} "
                f"but this call needs S {want}, z {want[:3]}, offset {want[:1]} (batch, heads, key dim, value dim): "
                "pass the state returned by the same layer for the same batch, or None to start fresh"
            )
        if not (self.S.is_floating_point() and self.S.dtype == self.z.dtype):
            raise TypeError(f"state S and z must share one floating dtype, got {self.S.dtype} and {self.z.dtype}")


def document_positions(starts: Tensor, offset: Tensor) -> Tensor:
    """The position of every token in its document, (B, T), for ``starts`` (B, T) bool, True on each token that
    starts a document: counted from 0 at the last start at or before it, and for the tokens before a row's first
    start (which continue the document of the state) from the row's ``offset`` (B,)."""
    idx = torch.arange(starts.shape[-1], device=starts.device)
    last_start = torch.where(starts, idx, -1).cummax(-1).values  # (B, T), -1 before the first start
    return torch.where(last_start >= 0, idx - last_start, offset[:, None] + idx)


# a pytree of its three tensors: torch.export, torch.compile and tree_map see through it (state in, state out)
torch.export.register_dataclass(RetentionState, serialized_type_name=f"{__name__}.RetentionState")
