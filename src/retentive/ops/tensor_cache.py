"""A cache for the small constant tensors every call needs (log gamma per head, the rotary angles).

Not ``functools.lru_cache``: ``torch.compile`` traces through an lru_cache and recomputes the tensor inside the
compiled code (for log gamma, inductor then evaluates its transcendental functions in the state update's innermost
loop, once per element), while a tensor found in a dict becomes a graph input, computed once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def tensor_cache(maxsize: int) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Cache a function of hashable arguments that returns a tensor; at most ``maxsize`` entries (then it starts
    afresh). ``.cache_clear()`` empties it."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        store: dict[tuple, Tensor] = {}

        @functools.wraps(fn)
        def cached(*args: Any) -> Tensor:
            value = store.get(args)
            if value is None:
                if len(store) >= maxsize:
                    store.clear()
                with torch.inference_mode(False):  # made while decoding, it must still serve training (autograd)
                    value = store[args] = fn(*args)
            return value

        cached.cache_clear = store.clear
        return cached

    return wrap
