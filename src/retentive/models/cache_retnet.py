"""RetNetCache: the whole past of a RetNet, one RetentionState per layer, in a size that does not grow.

A ``transformers.Cache`` so that ``generate()`` carries it between steps and reorders it in beam search.
Unlike a key-value cache it cannot be cropped: a recurrent state cannot forget its last tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree
from transformers import Cache

from ..ops import RetentionState

# transformers 5.24 renamed the cache of generate() and of the model outputs from ``past_key_values`` to ``cache``
# (the old name still works, with a deprecation warning). pyproject.toml admits 5.24 and later: the outputs carry
# ``cache``, and the models take the cache under either name (5.23's generate() refused the new one).
CACHE_NAME = "cache"
LEGACY_CACHE_NAME = "past_key_values"


def take_cache(cache: Any, kwargs: dict[str, Any]) -> RetNetCache | None:
    """The cache a forward was given as ``cache=`` or as ``past_key_values=`` (popped from ``kwargs``).

    Raises TypeError if both names are given, or if the object is not a :class:`RetNetCache`.
    """
    legacy = kwargs.pop(LEGACY_CACHE_NAME, None)
    if legacy is not None:
        if cache is not None:
            raise TypeError(f"the cache was given twice: pass it as cache= or as {LEGACY_CACHE_NAME}=, not both")
        cache = legacy
    if cache is not None and not isinstance(cache, RetNetCache):
        raise TypeError(f"cache must be a RetNetCache (what this model returns), got {type(cache).__name__}")
    return cache


def cache_of(output: Any) -> RetNetCache | None:
    """The cache of a model output (``out.cache``; ``out.past_key_values`` before transformers 5.24)."""
    return getattr(output, CACHE_NAME)


class RetNetCache(Cache):
    """The retention state (S, z, offset) of every layer, and how many tokens (padding included) it has read.

    Like transformers' static caches, a cache updates its own states in place: the states a decoding step made
    for this cache are written over by its next step (the ``"eager"`` and ``"native"`` steps do; ``"compiled"``
    and ``"aot"`` return new tensors), which allocates nothing and holds the state once instead of twice. The
    states given to the constructor or left by a prefill are never written, so that a prompt's cache can be
    continued twice (wrap its states in a new ``RetNetCache`` each time); clone ``cache.states`` to keep a state
    past the next step.

    Args:
        states: one :class:`RetentionState` per layer, or None for an empty cache (filled by the first forward).
        seen_tokens: the number of input positions already read.
        overwrite: let a decoding step write over these states too. Only for states nobody reads again, as a
            server's pool of slots.
    """

    is_compileable = False
    is_croppable = False

    def __init__(
        self, states: list[RetentionState] | None = None, seen_tokens: int = 0, overwrite: bool = False
    ) -> None:
        super().__init__(layers=[])
        self.states = states
        self.seen_tokens = seen_tokens
        self.overwrite = overwrite
        self.owns_states = False  # the states are ones a decoding step made for this cache

    def __len__(self) -> int:
        return 0 if self.states is None else len(self.states)

    def __repr__(self) -> str:
        return f"RetNetCache(layers={len(self)}, seen_tokens={self.seen_tokens}, nbytes={self.nbytes()})"

    def update_states(self, states: list[RetentionState], num_tokens: int, *, decoded: bool = False) -> None:
        """Replace the states by those after ``num_tokens`` more positions; ``decoded``: a decoding step made them
        for this cache (its next step may write over them)."""
        self.states = states
        self.seen_tokens += num_tokens
        self.owns_states = decoded

    @property
    def writable(self) -> bool:
        """Whether the next decoding step may write its new states over the current ones."""
        return self.overwrite or self.owns_states

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
    def is_linear(self) -> list[bool]:
        """False for every layer: this cache counts the positions it has read as a key-value cache does, so
        generate() slices a continued prompt by ``get_seq_length()`` (5.24 slices none for linear caches)."""
        return [False] * len(self)

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
        self.states, self.seen_tokens, self.owns_states = None, 0, False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "RetNetCache cannot be cropped: a recurrent state cannot forget its last tokens "
            "(assisted and speculative decoding need a croppable cache)"
        )

    def activate_past_recording(self) -> None:
        raise NotImplementedError("RetNetCache keeps no past tokens to roll back to")


def _flatten(cache: RetNetCache) -> tuple[list[Any], None]:
    return [cache.states, cache.seen_tokens], None


def _flatten_with_keys(cache: RetNetCache) -> tuple[list[tuple[Any, Any]], None]:
    return [(pytree.GetAttrKey("states"), cache.states), (pytree.GetAttrKey("seen_tokens"), cache.seen_tokens)], None


def _unflatten(children: list[Any], context: None) -> RetNetCache:
    return RetNetCache(*children)


# a pytree of its states (each a pytree of tensors) and its token count: torch.export takes and returns the cache
pytree.register_pytree_node(
    RetNetCache,
    _flatten,
    _unflatten,
    serialized_type_name=f"{__name__}.RetNetCache",
    flatten_with_keys_fn=_flatten_with_keys,
)


def export_decode_step(model: torch.nn.Module, cache: RetNetCache, input_ids: torch.Tensor | None = None):
    """``torch.export`` one decoding step, ``model(input_ids, cache=cache, use_cache=True)``, for every position.

    Args:
        model: a :class:`RetNetForCausalLM` (or :class:`RetNetModel`) in eval mode.
        cache: a filled cache of the batch size to serve (e.g. after a prefill); only its shapes are used.
        input_ids: (B, 1) an example token per row (default zeros).

    Returns:
        A ``torch.export.ExportedProgram``; ``program.module()(ids, cache=cache, use_cache=True)`` returns what the
        model does, with a new cache in place of the updated one (an exported program mutates none of its inputs).
        The token count is a dynamic input, so the one program serves every step.
    """
    if cache.states is None:
        raise ValueError("export_decode_step needs a filled cache (e.g. the one a prefill returned) for its shapes")
    if input_ids is None:
        input_ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.states[0].S.device)
    no_dims = [[None] * len(dataclasses.fields(s)) for s in cache.states]  # every state tensor keeps its shape
    dynamic = {"input_ids": None, "cache": [no_dims, torch.export.Dim.DYNAMIC], "use_cache": None}
    kwargs = {"cache": cache, "use_cache": True}
    return torch.export.export(model, (input_ids,), kwargs, dynamic_shapes=dynamic)
