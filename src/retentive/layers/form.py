"""How retention runs: its form and per-call options, resolved once at the top of a stack and handed down."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..ops import CHUNK_SIZE, MODES, check_chunk_size


@dataclass(frozen=True)
class Form:
    """The form of one call, the same for every layer of a stack.

    mode: ``"parallel"`` | ``"chunkwise"`` | ``"recurrent"``; chunk_size: tokens per chunk of the chunkwise form;
    causal: causal retention, or bidirectional (``attn_mask=None``); normalize_decay, normalize_retention: this call's
    choice of the normalizations (docs/math.md, "Normalizations"), None for each layer's own setting.
    """

    mode: str = "parallel"
    chunk_size: int = CHUNK_SIZE
    causal: bool = True
    normalize_decay: bool | None = None
    normalize_retention: bool | None = None

    @classmethod
    def resolve(
        cls,
        x: Tensor,
        attn_mask: str | None = "causal",
        num_chunks: int | None = None,
        normalize_attn: bool | None = None,
        normalize_retn: bool | None = None,
        *,
        mode: str | None = None,
        chunk_size: int | None = None,
    ) -> Form:
        """The form a forward's arguments ask for, checked: the library's ``mode`` and ``chunk_size``, or the seed
        repository's (myscience/retnet-pytorch) ``attn_mask``, ``num_chunks`` (None: parallel; k: chunkwise with
        ceil(T / k)-token chunks) and ``normalize_attn`` / ``normalize_retn`` (the decay and retention
        normalizations). x: (B, T, d), the input whose length T the chunks divide."""
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, length, dim_model), got shape {tuple(x.shape)}")
        if attn_mask not in ("causal", None):
            raise ValueError(f"attn_mask must be 'causal' or None (bidirectional), got {attn_mask!r}")
        T = x.shape[1]
        if num_chunks is not None:
            if mode not in (None, "chunkwise"):
                raise ValueError(f"num_chunks={num_chunks} asks for the chunkwise form but mode={mode!r}")
            if not isinstance(num_chunks, int) or not 1 <= num_chunks <= T:
                raise ValueError(
                    f"num_chunks must be an integer in [1, T={T}] (at most one chunk per token), got {num_chunks!r}"
                )
            mode, chunk_size = "chunkwise", math.ceil(T / num_chunks)
        mode = "parallel" if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        chunk_size = check_chunk_size(CHUNK_SIZE if chunk_size is None else chunk_size)
        return cls(mode, chunk_size, attn_mask == "causal", normalize_attn, normalize_retn)

    def steps_one_token(self, x: Tensor) -> bool:
        """Whether this form over ``x`` (B, T, d) is one causal recurrent step with each layer's own
        normalizations: what a decode step computes."""
        plain = self.normalize_decay is None and self.normalize_retention is None
        return self.mode == "recurrent" and self.causal and plain and x.shape[1] == 1

    def normalizations(self, normalize_decay: bool, normalize_retention: bool) -> dict[str, bool]:
        """This call's normalizations, a layer's own (the arguments) where the form leaves them None: keywords of
        :func:`retentive.ops.retention`."""
        decay, retention = self.normalize_decay, self.normalize_retention
        return {
            "normalize_decay": normalize_decay if decay is None else decay,
            "normalize_retention": normalize_retention if retention is None else retention,
        }
