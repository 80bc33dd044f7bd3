"""Resumable, distributed batch samplers: a position in an endless sequence of shuffled epochs.

Item ``i`` of the sequence is item ``perm_e[i % n]`` of the dataset, with ``e = i // n`` and ``perm_e`` a permutation
drawn from ``(seed, e)``. A global batch of ``G = B * world_size`` items starts at ``position``; rank ``r`` takes
items ``[position + r * B, position + (r + 1) * B)``. So one process with batch ``2B`` sees exactly the items that two
processes with batch ``B`` see together, and the whole state is one integer: the position.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class IndexSampler:
    """Indices of the next batch for this rank.

    Args:
        num_items: n, the dataset size.
        batch_size: B, items per batch on this rank.
        seed: draws the permutation of every epoch.
        rank, world_size: this process and the number of processes (``torch.distributed``).
        shuffle: ``False`` walks the items in order (epochs repeat).
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}: the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.position = 0  # items consumed by all ranks together
        self._epoch, self._perm = -1, np.arange(num_items)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.shuffle and epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return self._perm

    def next_indices(self) -> np.ndarray:
        """The indices of this rank's next batch, shape (B,); advances the position by the global batch."""
        start = self.position + self.rank * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for j, i in enumerate(range(start, start + self.batch_size)):
            out[j] = self._permutation(i // self.num_items)[i % self.num_items]
        self.position += self.batch_size * self.world_size
        return out

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self.position / self.num_items

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['num_items']} items with seed {state['seed']}, this sampler has "
                f"{self.num_items} items with seed {self.seed}: resume with the same data and seed"
            )
        self.position = int(state["position"])


class TensorBatches:
    """Batches from in-memory tensors that share their first dimension (e.g. images and labels).

    Args:
        tensors: name -> tensor (N, ...); each batch is ``{name: tensor[indices]}``, the model's keyword arguments.
        batch_size, seed, rank, world_size, shuffle: as :class:`IndexSampler`.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        sizes = {name: t.shape[0] for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors must share their first dimension, got {sizes}")
        self.tensors = tensors
        self.sampler = IndexSampler(next(iter(sizes.values())), batch_size, seed, rank, world_size, shuffle)

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(self.sampler.next_indices())
        return {name: t[idx] for name, t in self.tensors.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
