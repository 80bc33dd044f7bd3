"""Exact prompt-state caching: the state after a token prefix, kept under a hash of those tokens.

A RetNet state after n tokens has the same size whatever n is, and it holds everything the model needs to continue
from there, so a later prompt that starts with the same n tokens can skip them and resume at token n exactly (not
only at block boundaries). The same cache keeps a Transformer's keys and values for a prefix, whose size grows with n.

Entries live in memory within a byte budget, least recently used evicted first; with a directory, an evicted entry
is written there as safetensors (within its own byte budget) and read back when a prompt needs it. Files written by
another model or weights are never matched: the key hashes the model's fingerprint with the tokens.

A file is trusted no more than the disk it lies on: each carries its key (the tokens it belongs to) and a checksum of
its tensors, checked when it is read; one that fails is deleted and is a miss. The caller checks the shapes (the
backend knows them) and keeps a read entry in memory, with :meth:`PrefixCache.insert`, only once it has used it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

logger = logging.getLogger(__name__)

LOGITS = "next_token_logits"


def checksum(tensors: dict[str, Tensor]) -> str:
    """A hash of the tensors' names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Entry:
    """The state after ``length`` prompt tokens, and the logits of the token that follows them.

    Attributes:
        length: how many tokens the state has read.
        tensors: the backend's snapshot (``Backend.snapshot``) plus ``next_token_logits`` (V,).
    """

    length: int
    tensors: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's class, config and weights: entries of one model are never served to another."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class PrefixCache:
    """States after token prefixes: in memory (LRU within ``max_bytes``), optionally spilled to ``directory``.

    Args:
        fingerprint: the model's :func:`model_fingerprint`.
        max_bytes: the memory budget; an entry larger than it is not kept.
        directory: where evicted entries go as ``<key>.safetensors`` (None: they are dropped).
        max_disk_bytes: the budget of ``directory``; the oldest files are deleted beyond it.
    """

    def __init__(
        self, fingerprint: str, max_bytes: int, directory: str | Path | None = None, max_disk_bytes: int = 0
    ) -> None:
        if max_bytes < 0 or max_disk_bytes < 0:
            raise ValueError(f"cache budgets must be >= 0 bytes, got {max_bytes} and {max_disk_bytes}")
        self.fingerprint = fingerprint
        self.max_bytes, self.max_disk_bytes = max_bytes, max_disk_bytes
        self.memory: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.lengths: dict[int, int] = {}  # prefix length -> number of entries of that length (memory and disk)
        self.directory = None if directory is None else Path(directory) / fingerprint
        self.disk: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (length, bytes), oldest first
        self.disk_bytes = 0
        self.hits = self.misses = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._index_disk()

    def key(self, tokens: list[int]) -> str:
        data = array("q", tokens).tobytes()
        return hashlib.blake2b(self.fingerprint.encode() + data, digest_size=20).hexdigest()

    def __contains__(self, tokens: list[int]) -> bool:
        key = self.key(tokens)
        return key in self.memory or key in self.disk

    def lookup(self, tokens: list[int]) -> Entry | None:
        """The entry of the longest cached prefix of ``tokens`` (the whole of it included), or None.

        An entry read from disk leaves the disk and is not kept in memory: :meth:`insert` it once it proved good.
        """
        for length in sorted((n for n in self.lengths if n <= len(tokens)), reverse=True):
            key = self.key(tokens[:length])
            entry = self.memory.get(key)
            if entry is not None:
                self.memory.move_to_end(key)
            elif key in self.disk:
                entry = self._load(key, length)
            if entry is not None:
                self.hits += 1
                return entry
        self.misses += 1
        return None

    def discard(self, tokens: list[int]) -> None:
        """Forget the entry of ``tokens`` (in memory), one its user found unfit."""
        entry = self.memory.pop(self.key(tokens), None)
        if entry is not None:
            self.bytes -= entry.nbytes
            self._forget_length(entry.length)

    def insert(self, tokens: list[int], tensors: dict[str, Tensor]) -> None:
        """Keep the state after ``tokens`` (a snapshot and ``next_token_logits``)."""
        key, entry = self.key(tokens), Entry(len(tokens), tensors)
        if key not in self.memory and key not in self.disk and entry.nbytes <= self.max_bytes:
            self._put(key, entry)

    def _put(self, key: str, entry: Entry) -> None:
        """Add an entry to memory, evicting (and spilling) the least recently used ones beyond the budget."""
        self.memory[key] = entry
        self.bytes += entry.nbytes
        self.lengths[entry.length] = self.lengths.get(entry.length, 0) + 1
        while self.bytes > self.max_bytes and len(self.memory) > 1:
            old_key, old = self.memory.popitem(last=False)
            self.bytes -= old.nbytes
            self._forget_length(old.length)
            self._spill(old_key, old)

    def _forget_length(self, length: int) -> None:
        self.lengths[length] -= 1
        if not self.lengths[length]:
            del self.lengths[length]

    def _spill(self, key: str, entry: Entry) -> None:
        if self.directory is None or entry.nbytes > self.max_disk_bytes:
            return
        path = self.directory / f"{key}.safetensors"
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # replicas may share the directory
        metadata = {"length": str(entry.length), "key": key, "checksum": checksum(entry.tensors)}
        save_file({k: v.contiguous() for k, v in entry.tensors.items()}, tmp, metadata=metadata)
        tmp.replace(path)
        self.disk[key] = (entry.length, entry.nbytes)
        self.disk_bytes += entry.nbytes
        self.lengths[entry.length] = self.lengths.get(entry.length, 0) + 1
        while self.disk_bytes > self.max_disk_bytes:
            old_key, (length, nbytes) = self.disk.popitem(last=False)
            self.disk_bytes -= nbytes
            self._forget_length(length)
            (self.directory / f"{old_key}.safetensors").unlink(missing_ok=True)

    def _load(self, key: str, length: int) -> Entry | None:
        """Read a spilled entry off the disk; None if its file is unreadable or not the one it claims to be."""
        self.disk_bytes -= self.disk.pop(key)[1]
        self._forget_length(length)
        path = self.directory / f"{key}.safetensors"
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
            wrong = _mismatch(metadata, key, length, tensors)
        except Exception as e:  # damaged or deleted behind our back: a miss, not an error
            wrong = f"cannot read it ({e})"
        finally:
            path.unlink(missing_ok=True)  # read once: it comes back to memory, or it was bad
        if wrong:
            logger.warning("prompt cache: %s: %s; dropped", path, wrong)
            return None
        return Entry(length, tensors)

    def _index_disk(self) -> None:
        """Find the entries a previous server (or another replica) left in the directory, oldest first; unreadable
        files are deleted."""
        files = []
        for path in self.directory.glob("*.safetensors"):
            try:
                stat = path.stat()
                with safe_open(path, framework="pt") as f:
                    files.append((stat.st_mtime, path, int(f.metadata()["length"]), stat.st_size))
            except FileNotFoundError:  # another replica took it meanwhile
                continue
            except Exception as e:
                logger.warning("prompt cache: deleting unreadable %s (%s)", path, e)
                path.unlink(missing_ok=True)
        for _, path, length, size in sorted(files):
            self.disk[path.stem] = (length, size)
            self.disk_bytes += size
            self.lengths[length] = self.lengths.get(length, 0) + 1

    def stats(self) -> dict:
        return {
            "entries": len(self.memory),
            "bytes": self.bytes,
            "disk_entries": len(self.disk),
            "disk_bytes": self.disk_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


def _mismatch(metadata: dict[str, str], key: str, length: int, tensors: dict[str, Tensor]) -> str | None:
    """What is wrong with a file read for ``key`` (the state after ``length`` tokens), or None."""
    if metadata.get("key") != key:  # another prompt's file under this name, or one from an older format
        return f"it holds the state of other tokens (key {metadata.get('key')})"
    if metadata.get("length") != str(length):
        return f"it holds {metadata.get('length')} tokens, not {length}"
    if metadata.get("checksum") != checksum(tensors):
        return "its tensors differ from their checksum"
    return None
