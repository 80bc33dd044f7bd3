"""RetNetCache: the whole past of a RetNet, one RetentionState per layer, in a size that does not grow.

A ``transformers.Cache`` so that ``generate()`` carries it between steps and reorders it in beam search.
Unlike a key-value cache it cannot be cropped: a recurrent state cannot forget its last tokens.
"""

from __future__ import annotations

import torch
from transformers import Cache

from ..ops import RetentionState


class RetNetCache(Cache):
    """The retention state (S, z, offset) of every layer, and how many tokens (padding included) it has read.

    Args:
        states: one :class:`RetentionState` per layer, or None for an empty cache (filled by the first forward).
        seen_tokens: the number of input positions already read.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, states: list[RetentionState] | None = None, seen_tokens: int = 0) -> None:
        super().__init__(layers=[])
        self.states = states
        self.seen_tokens = seen_tokens

    def __len__(self) -> int:
        return 0 if self.states is None else len(self.states)

    def __repr__(self) -> str:
        return f"RetNetCache(layers={len(self)}, seen_tokens={self.seen_tokens}, nbytes={self.nbytes()})"

    def update_states(self, states: list[RetentionState], num_tokens: int) -> None:
        """Replace the states by those after ``num_tokens`` more positions."""
        self.states = states
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions read so far (padding included), as generate() expects."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: no maximum, the state does not grow with the length."""
        return -1

    def nbytes(self) -> int:
        """Bytes held by the cache; the same after 10 tokens as after a million."""
        return 0 if self.states is None else sum(s.nbytes() for s in self.states)

    @property
    def batch_size(self) -> int:
        return -1 if self.states is None else self.states[0].S.shape[0]

    @property
    def is_initialized(self) -> bool:
        return self.states is not None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows ``beam_idx`` (beam search)."""
        if self.states is not None:
            self.states = [s.index_select(beam_idx) for s in self.states]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (one row per beam or returned sequence)."""
        if self.states is not None:
            index = torch.arange(self.batch_size, device=self.states[0].S.device).repeat_interleave(repeats)
            self.reorder_cache(index)

    def reset(self) -> None:
        """Forget everything read."""
        self.states, self.seen_tokens = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "RetNetCache cannot be cropped: a recurrent state cannot forget its last tokens "
            "(assisted and speculative decoding need a croppable cache)"
        )

    def activate_past_recording(self) -> None:
        raise NotImplementedError("RetNetCache keeps no past tokens to roll back to")
