"""A corpus tokenized once into memory-mapped token files, and the (B, T+1) windows a language model trains on.

``tokenize_corpus`` writes ``<cache>/<hash>/{train,val}.bin`` (uint16 when the vocabulary fits, else uint32) and
``meta.json``; the hash covers the documents and the tokenizer, so a second run with the same inputs reuses the
files. Every document is split in two: its last ``val_fraction`` of tokens go to the validation file, the rest to
the training file, so validation samples every work of the corpus. Each part ends with the end-of-text id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._fsync import fsync_path
from ..ops import document_positions
from .sampler import IndexSampler
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_ENCODE_GROUP = 64  # documents encoded together (the tokenizer parallelizes over a group)


@dataclass
class TokenSplits:
    """Memory-mapped token files of one tokenized corpus.

    Attributes:
        train, val: read-only token arrays (N,), uint16 or uint32.
        directory: where the files are.
    """

    train: np.ndarray
    val: np.ndarray
    directory: Path


def corpus_hash(docs: list[str], tokenizer: Tokenizer, val_fraction: float) -> str:
    """The cache key of a tokenized corpus: documents, tokenizer and split."""
    h = hashlib.sha256(f"{tokenizer.fingerprint()}|{val_fraction}|{len(docs)}".encode())
    for d in docs:
        data = d.encode("utf-8", errors="replace")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:20]


def tokenize_corpus(
    docs: list[str], tokenizer: Tokenizer, cache_dir: str | Path, val_fraction: float = 0.05
) -> TokenSplits:
    """Tokenize ``docs`` into memory-mapped train/validation files, or reuse the cached ones.

    Args:
        docs: the documents.
        tokenizer: any :class:`Tokenizer`.
        cache_dir: where token files are kept (one subfolder per content hash).
        val_fraction: the share of each document's tokens held out for validation, in [0, 1).

    Returns:
        The memory-mapped splits.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    directory = Path(cache_dir) / corpus_hash(docs, tokenizer, val_fraction)
    if not (directory / "meta.json").is_file():
        _write_token_files(docs, tokenizer, directory, val_fraction)
    else:
        logger.info("reusing token files in %s", directory)
    return load_token_splits(directory)


def _write_token_files(docs: list[str], tokenizer: Tokenizer, directory: Path, val_fraction: float) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    counts = {"train": 0, "val": 0}
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    with open(tmp / "train.bin", "wb") as f_train, open(tmp / "val.bin", "wb") as f_val:
        for g in range(0, len(docs), _ENCODE_GROUP):
            for ids in tokenizer.encode_batch(docs[g : g + _ENCODE_GROUP]):
                arr = np.asarray(ids, dtype=dtype)
                cut = len(arr) - round(val_fraction * len(arr))
                for name, part, f in (("train", arr[:cut], f_train), ("val", arr[cut:], f_val)):
                    if len(part):
                        f.write(part.tobytes())
                        f.write(eos.tobytes())
                        counts[name] += len(part) + 1
    meta = {"dtype": np.dtype(dtype).name, "train_tokens": counts["train"], "val_tokens": counts["val"]}
    meta |= {"tokenizer": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size, "documents": len(docs)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for p in tmp.iterdir():
        fsync_path(p)
    try:
        os.replace(tmp, directory)
        fsync_path(directory.parent)
    except OSError:  # another process wrote the same files first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("tokenized %d documents: %s train, %s validation tokens", len(docs), counts["train"], counts["val"])


def load_token_splits(directory: str | Path) -> TokenSplits:
    """Open the token files written by :func:`tokenize_corpus` as read-only memory maps."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())

    def open_split(name: str) -> np.ndarray:
        if meta[f"{name}_tokens"] == 0:
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(directory / f"{name}.bin", dtype=meta["dtype"], mode="r")

    return TokenSplits(train=open_split("train"), val=open_split("val"), directory=directory)


def _windows(tokens: np.ndarray, seq_len: int, split: str) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"the {split} split has {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}: "
            "use more text or a shorter --seq-len"
        )
    return n


def _window(tokens: np.ndarray, index: int, seq_len: int) -> np.ndarray:
    start = index * seq_len
    return tokens[start : start + seq_len + 1].astype(np.int64)  # (T+1,)


def window_batch(windows: np.ndarray, eos_id: int | None = None) -> dict[str, Any]:
    """(B, T+1) token windows as the model's keyword arguments: input_ids, and labels that the model shifts.

    With ``eos_id``, also ``position_ids`` that restart at 0 on every end-of-text token, as transformers'
    ``DataCollatorWithFlattening`` marks packed documents: each document in a window is then read on its own, no
    state (or attention) crossing from the one before. The end-of-text token opens the next document, as a BOS
    would: a document's last token predicts the end-of-text from its own document, and the end-of-text predicts the
    next document's first token from itself alone. And ``use_cache=False``: transformers' Transformers read
    position_ids as documents only where no cache is built, which they otherwise do even in training.
    """
    ids = torch.from_numpy(windows)
    batch = {"input_ids": ids, "labels": ids}
    if eos_id is not None:
        batch["position_ids"] = document_positions(ids == eos_id, torch.zeros(len(ids), dtype=torch.long))
        batch["use_cache"] = False
    return batch


class TokenWindows:
    """Shuffled training batches of (B, T+1) token windows; the model shifts them into inputs and labels.

    Window ``i`` is ``tokens[i*T : i*T + T + 1]`` (consecutive windows share one token). The sampler's position
    is the resumable state.

    Args:
        tokens: the token array (N,).
        seq_len: T.
        batch_size: B on this rank.
        seed, rank, world_size: as :class:`IndexSampler`.
        eos_id: mark the documents in each window (see :func:`window_batch`); None: a window is one stream.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        eos_id: int | None = None,
    ) -> None:
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        n = _windows(tokens, seq_len, "training")
        self.sampler = IndexSampler(n, batch_size, seed, rank, world_size)

    def next_batch(self) -> dict[str, Any]:
        ids = np.stack([_window(self.tokens, int(i), self.seq_len) for i in self.sampler.next_indices()])
        return window_batch(ids, self.eos_id)  # (B, T+1) each

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class EvalWindows:
    """The first ``max_batches`` global batches of consecutive (B, T+1) windows, in order; iterable again and again.

    Args:
        tokens: the held-out token array (N,).
        seq_len, batch_size, rank, world_size: as :class:`TokenWindows`.
        max_batches: at most this many batches per rank (None: all full batches).
        eos_id: as :class:`TokenWindows`.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        eos_id: int | None = None,
    ) -> None:
        self.tokens, self.seq_len, self.batch_size, self.eos_id = tokens, seq_len, batch_size, eos_id
        self.rank, self.world_size = rank, world_size
        n = _windows(tokens, seq_len, "validation")
        global_batch = batch_size * world_size
        self.num_batches = max(1, n // global_batch)
        if max_batches is not None:
            self.num_batches = min(self.num_batches, max_batches)
        self.num_windows = min(n, self.num_batches * global_batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        global_batch = self.batch_size * self.world_size
        for b in range(self.num_batches):
            start = b * global_batch + self.rank * self.batch_size
            idx = range(start, min(start + self.batch_size, self.num_windows))
            if len(idx) == 0:
                continue
            yield window_batch(np.stack([_window(self.tokens, i, self.seq_len) for i in idx]), self.eos_id)

    def __len__(self) -> int:
        return self.num_batches
