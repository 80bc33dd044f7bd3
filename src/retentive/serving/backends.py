"""What the engine asks of a model: fill a slot's state with prompt tokens, decode one token for many slots at once.

Two backends share one interface (:class:`Backend`), so the scheduler and the HTTP server are the same code for both:

- :class:`RetNetBackend`: one fixed-size retention state per slot, held in a pool allocated once for ``max_batch``
  slots (per layer S (N, H, Dk, Dv), z (N, H, Dk), offset (N,)). A decode step gathers the running slots' rows,
  runs one recurrent step for all of them (rows at different positions batch fine: each row carries its offset)
  and writes the new rows back. Prefill runs the chunkwise form on one slot's row.
- :class:`KVCacheBackend`: a Hugging Face causal LM with a key-value cache (the Llama baseline). Each slot owns a
  ``DynamicCache`` that grows with its tokens. Decoding batches the running slots with LEFT padding (as
  ``generate()`` does for prompts of different lengths: an attention mask over the padding and explicit positions);
  the padded batch (preallocated, written in place) is kept while the same slots run and rebuilt, from each row's
  own keys and values, whenever a slot joins or leaves.

All methods run on the engine's thread, under ``torch.inference_mode``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache

from ..models import RetNetCache, RetNetForCausalLM, cache_of
from ..models.cache_retnet import CACHE_NAME
from ..ops import RetentionState


class Backend:
    """A model behind ``max_batch`` state slots, numbered 0 .. max_batch - 1.

    Attributes:
        model: the causal LM, in eval mode.
        max_batch: the number of slots.
        seen: tokens read so far by each slot's state.
    """

    kind = "model"

    def __init__(self, model: nn.Module, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.max_batch = max_batch
        self.seen = [0] * max_batch
        self.device = next(model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def prefill(self, slot: int, ids: list[int]) -> Tensor:
        """Read ``ids`` into the state of ``slot`` (after what it holds); returns the next-token logits (V,) float32."""
        raise NotImplementedError

    def decode(self, slots: list[int], ids: list[int]) -> Tensor:
        """One token per slot, all slots in one batch: ``ids[i]`` is read into ``slots[i]``. Returns (B, V) float32."""
        raise NotImplementedError

    def fork(self, src: int, dst: int) -> None:
        """Make ``dst`` hold a copy of the state of ``src`` (the other choices of a request with n > 1)."""
        self.restore(dst, self.snapshot(src), self.seen[src])

    def release(self, slot: int) -> None:
        """Forget what ``slot`` holds; it starts empty for its next request."""
        self.seen[slot] = 0

    def snapshot(self, slot: int) -> dict[str, Tensor]:
        """A copy of the state of ``slot``, as named tensors (what the prompt-state cache keeps and saves)."""
        raise NotImplementedError

    def restore(self, slot: int, tensors: dict[str, Tensor], seen: int) -> None:
        """Put a :meth:`snapshot` (of a state that read ``seen`` tokens) into an empty ``slot``."""
        raise NotImplementedError

    def snapshot_layout(self, seen: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The name, shape and dtype of each tensor of a :meth:`snapshot` after ``seen`` tokens."""
        raise NotImplementedError

    def check_snapshot(self, tensors: dict[str, Tensor], seen: int) -> None:
        """Raise ValueError, naming the tensor, unless ``tensors`` is a snapshot of this model after ``seen`` tokens
        (one read from disk may come from anywhere)."""
        layout = self.snapshot_layout(seen)
        if set(tensors) != set(layout):
            raise ValueError(f"a snapshot holds {sorted(layout)}, not {sorted(tensors)}")
        for name, (shape, dtype) in layout.items():
            if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
                got = f"{tuple(tensors[name].shape)} {tensors[name].dtype}"
                raise ValueError(f"snapshot tensor {name} is {got}, not {shape} {dtype}")

    def state_bytes(self) -> int:
        """Bytes held now by the states of all slots (what grows with the context, if anything does)."""
        raise NotImplementedError

    def prompt_logits(self, ids: list[int], piece: int = 512) -> Iterator[Tensor]:
        """The logits at every position of ``ids``, float32, ``piece`` positions at a time ((piece, V) each), from
        forwards that carry their own cache and touch no slot: an echoed prompt's log-probabilities, in memory
        that does not grow with the prompt (all its logits at once would be T x V floats)."""
        cache = None
        for start in range(0, len(ids), piece):
            x = torch.tensor([ids[start : start + piece]], device=self.device)
            out = self.model(input_ids=x, use_cache=True, **{CACHE_NAME: cache})
            cache = cache_of(out)
            yield out.logits[0].float()

    def _logits(self, ids: Tensor, cache, use_cache: bool = True):
        out = self.model(input_ids=ids, use_cache=use_cache, logits_to_keep=1, **{CACHE_NAME: cache})
        return out.logits[:, -1].float(), cache_of(out)


class RetNetBackend(Backend):
    """:class:`RetNetForCausalLM` over a pool of ``max_batch`` retention states, one row per slot.

    Prefill runs the chunkwise form with ``config.chunk_size``, as ``generate()`` does.
    """

    kind = "retnet"

    def __init__(self, model: RetNetForCausalLM, max_batch: int) -> None:
        super().__init__(model, max_batch)
        probe = cache_of(model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=True))
        # the pool: per layer S (N, H, Dk, Dv), z (N, H, Dk), offset (N,); allocated once, reused by every request
        self.S = [s.S.new_zeros((max_batch, *s.S.shape[1:])) for s in probe.states]
        self.z = [s.z.new_zeros((max_batch, *s.z.shape[1:])) for s in probe.states]
        self.offset = [s.offset.new_zeros(max_batch) for s in probe.states]
        self._slot_bytes = sum(t[0].numel() * t.element_size() for t in (*self.S, *self.z, *self.offset))

    def _rows(self, rows: slice | Tensor) -> list[RetentionState]:
        if isinstance(rows, slice):  # a contiguous run of slots: views, no copy
            return [
                RetentionState(S[rows], z[rows], o[rows]) for S, z, o in zip(self.S, self.z, self.offset, strict=True)
            ]
        return [
            RetentionState(S.index_select(0, rows), z.index_select(0, rows), o.index_select(0, rows))
            for S, z, o in zip(self.S, self.z, self.offset, strict=True)
        ]

    def _write(self, rows: slice | Tensor, states: list[RetentionState], read: list | None = None) -> None:
        """Put ``states`` into the pool's ``rows``. ``read``: the states the step read; where ``rows`` is a slice
        they are views of the pool, and a tensor the step wrote over in place (``overwrite``) is one of them."""
        for i, (S, z, o, new) in enumerate(zip(self.S, self.z, self.offset, states, strict=True)):
            if not isinstance(rows, slice):
                S.index_copy_(0, rows, new.S)
                z.index_copy_(0, rows, new.z)
                o.index_copy_(0, rows, new.offset)
                continue
            old = read[i] if read is not None else RetentionState(None, None, None)
            for pool, t, view in ((S, new.S, old.S), (z, new.z, old.z), (o, new.offset, old.offset)):
                if t is not view:  # else it is in the pool already
                    pool[rows] = t

    def prefill(self, slot: int, ids: list[int]) -> Tensor:
        rows = slice(slot, slot + 1)
        # an empty slot reads its first piece with no state, exactly as generate() reads a prompt
        cache = RetNetCache(self._rows(rows), self.seen[slot]) if self.seen[slot] else None
        x = torch.tensor([ids], device=self.device)
        logits, cache = self._logits(x, cache)
        self._write(rows, cache.states)
        self.seen[slot] += len(ids)
        return logits[0]

    def decode(self, slots: list[int], ids: list[int]) -> Tensor:
        first = slots[0]
        contiguous = slots == list(range(first, first + len(slots)))
        rows = slice(first, first + len(slots)) if contiguous else torch.tensor(slots, device=self.device)
        x = torch.tensor(ids, device=self.device)[:, None]  # (B, 1)
        # the new states may go over the old: nobody reads a slot's old state again
        read = self._rows(rows)
        logits, cache = self._logits(x, RetNetCache(read, 1, overwrite=True))
        self._write(rows, cache.states, read)
        for slot in slots:
            self.seen[slot] += 1
        return logits

    def snapshot(self, slot: int) -> dict[str, Tensor]:
        out = {}
        for i, (S, z, o) in enumerate(zip(self.S, self.z, self.offset, strict=True)):
            out[f"S.{i}"], out[f"z.{i}"], out[f"offset.{i}"] = S[slot].clone(), z[slot].clone(), o[slot].clone()
        return out

    def restore(self, slot: int, tensors: dict[str, Tensor], seen: int) -> None:
        for i, (S, z, o) in enumerate(zip(self.S, self.z, self.offset, strict=True)):
            S[slot], z[slot], o[slot] = tensors[f"S.{i}"], tensors[f"z.{i}"], tensors[f"offset.{i}"]
        self.seen[slot] = seen

    def snapshot_layout(self, seen: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        layout = {}
        for i, (S, z, o) in enumerate(zip(self.S, self.z, self.offset, strict=True)):
            for name, pool in (("S", S), ("z", z), ("offset", o)):
                layout[f"{name}.{i}"] = (tuple(pool.shape[1:]), pool.dtype)
        return layout

    def slot_bytes(self) -> int:
        """Bytes of one slot's state: the same after 10 tokens as after a million."""
        return self._slot_bytes

    def state_bytes(self) -> int:
        return self.slot_bytes() * sum(1 for s in self.seen if s)


class KVCacheBackend(Backend):
    """A Hugging Face causal LM with a ``DynamicCache`` per slot; decoding batches the slots with left padding."""

    kind = "transformer"
    ROOM = 64  # decode steps a padded batch has room for before it is rebuilt longer

    def __init__(self, model: nn.Module, max_batch: int) -> None:
        super().__init__(model, max_batch)
        self.caches: list[DynamicCache | None] = [None] * max_batch
        self.batch: list[int] = []  # the slots of the padded batch, in row order
        self.batch_cache: DynamicCache | None = None
        self.batch_mask: Tensor | None = None  # (B, L) 1 on real positions, 0 on the left padding

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def prefill(self, slot: int, ids: list[int]) -> Tensor:
        x = torch.tensor([ids], device=self.device)
        logits, self.caches[slot] = self._logits(x, self.caches[slot])
        self.seen[slot] += len(ids)
        return logits[0]

    def decode(self, slots: list[int], ids: list[int]) -> Tensor:
        if slots != self.batch or self.batch_mask.shape[1] == self.batch_cache.get_max_length():
            self._unbatch()
            self._batch(slots)
        B = len(slots)
        x = torch.tensor(ids, device=self.device)[:, None]  # (B, 1)
        self.batch_mask = torch.cat([self.batch_mask, self.batch_mask.new_ones(B, 1)], dim=1)  # (B, L + 1)
        positions = torch.tensor([self.seen[s] for s in slots], device=self.device)[:, None]  # (B, 1)
        out = self.model(
            input_ids=x,
            attention_mask=self.batch_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_NAME: self.batch_cache},
        )
        self.batch_cache = cache_of(out)
        for slot in slots:
            self.seen[slot] += 1
        return out.logits[:, -1].float()

    def _batch(self, slots: list[int]) -> None:
        """Left-pad the slots' caches into one preallocated batch: (B, H, L + ROOM, D) per layer, L the longest.

        A ``StaticCache``: each step writes its token's keys and values in place (a ``DynamicCache`` would copy
        the whole batch's cache to append them); a batch that has filled its room is rebuilt with more.
        """
        length = max(self.seen[s] for s in slots)
        cache = StaticCache(config=self.model.config, max_cache_len=length + self.ROOM)
        for layer in range(self.num_layers):
            parts = [self.caches[s].layers[layer] for s in slots]
            keys = parts[0].keys.new_zeros((len(slots), parts[0].keys.shape[1], length, parts[0].keys.shape[-1]))
            values = parts[0].values.new_zeros((*keys.shape[:3], parts[0].values.shape[-1]))
            for row, (slot, part) in enumerate(zip(slots, parts, strict=True)):
                keys[row, :, length - self.seen[slot] :] = part.keys[0]
                values[row, :, length - self.seen[slot] :] = part.values[0]
            cache.update(keys, values, layer)
        mask = torch.zeros(len(slots), length, dtype=torch.long, device=self.device)
        for row, slot in enumerate(slots):
            mask[row, length - self.seen[slot] :] = 1
        self.batch, self.batch_cache, self.batch_mask = list(slots), cache, mask
        for slot in slots:
            self.caches[slot] = None  # the batch holds their keys and values now

    def _unbatch(self) -> None:
        """Give every slot of the padded batch its own cache back (its rows without the padding)."""
        if not self.batch:
            return
        length = self.batch_mask.shape[1]
        for row, slot in enumerate(self.batch):
            if slot < 0:  # released while in the batch
                continue
            cache = DynamicCache(config=self.model.config)
            for layer in range(self.num_layers):
                part, start = self.batch_cache.layers[layer], length - self.seen[slot]
                keys, values = part.keys[row : row + 1, :, start:length], part.values[row : row + 1, :, start:length]
                cache.update(keys.clone(), values.clone(), layer)
            self.caches[slot] = cache
        self.batch, self.batch_cache, self.batch_mask = [], None, None

    def release(self, slot: int) -> None:
        super().release(slot)
        self.caches[slot] = None
        if slot in self.batch:  # its row stays in the padded batch, dead, until the batch is rebuilt
            self.batch[self.batch.index(slot)] = -1

    def _own_cache(self, slot: int) -> DynamicCache:
        if slot in self.batch:
            self._unbatch()
        return self.caches[slot]

    def snapshot(self, slot: int) -> dict[str, Tensor]:
        cache, out = self._own_cache(slot), {}
        for i, layer in enumerate(cache.layers):
            out[f"keys.{i}"], out[f"values.{i}"] = layer.keys[0].clone(), layer.values[0].clone()
        return out

    def restore(self, slot: int, tensors: dict[str, Tensor], seen: int) -> None:
        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(tensors[f"keys.{i}"][None].clone(), tensors[f"values.{i}"][None].clone(), i)
        self.caches[slot], self.seen[slot] = cache, seen

    def snapshot_layout(self, seen: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        shape = (heads, seen, head_dim)
        return {f"{kind}.{i}": (shape, dtype) for i in range(self.num_layers) for kind in ("keys", "values")}

    def state_bytes(self) -> int:
        caches = [c for c in self.caches if c is not None]
        if self.batch_cache is not None:
            caches.append(self.batch_cache)
        tensors = [t for c in caches for layer in c.layers for t in (layer.keys, layer.values)]
        return sum(t.numel() * t.element_size() for t in tensors)


def backend_for(model: nn.Module, max_batch: int) -> Backend:
    """The backend that serves ``model``: RetNet's state pool, or a key-value cache per slot for any other causal LM."""
    if isinstance(model, RetNetForCausalLM):
        return RetNetBackend(model, max_batch)
    return KVCacheBackend(model, max_batch)
