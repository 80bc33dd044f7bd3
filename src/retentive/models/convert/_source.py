"""Reading a foreign checkpoint: its tensors (never by running its code) and its own configuration.

A checkpoint is a file (a torchscale / fairseq ``.pt``, a ``.bin``, a ``.safetensors``) or a folder (a Hugging Face
``save_pretrained`` folder: ``config.json`` and one or more weight files, sharded or not). Pickles are read with
``torch.load(weights_only=True)`` only, so a file that needs code to unpickle is refused with what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# files of a Hugging Face tokenizer, copied next to the converted weights when the source folder has them
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, the key and what to do."""


@dataclasses.dataclass
class Source:
    """The tensors of a checkpoint, where they came from, and the source's own configuration (or {})."""

    path: Path  # what the user named: a file or a folder
    files: list[Path]  # the weight files read
    state: dict[str, Tensor]
    config: dict[str, Any]
    folder: Path  # where tokenizer files would sit

    @property
    def where(self) -> str:
        """The weight file, or the folder when the weights span several files: for error messages."""
        return str(self.files[0] if len(self.files) == 1 else self.path)


def read_source(path: str | Path) -> Source:
    """Read a checkpoint file or folder (see the module docstring). Raises ConversionError naming the path."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder (give a checkpoint file or a downloaded model folder)")
    if path.is_file():
        state, config = _read_weights(path)
        return Source(path, [path], state, config, path.parent)
    config = {}
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    files = _weight_files(path)
    state: dict[str, Tensor] = {}
    for file in files:
        part, embedded = _read_weights(file)
        state.update(part)
        config = config or embedded
    return Source(path, files, state, config, path)


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: safetensors first (sharded or not), else pickles."""
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin", "*.pt", "*.pth"):
        files = sorted(folder.glob(pattern))
        if files:
            break
    else:
        raise ConversionError(
            f"{folder}: no weight file (*.safetensors, *.bin, *.pt) in this folder: download the model's weights too"
        )
    if len(files) > 1 and files[0].suffix in (".pt", ".pth") and not all(_is_shard(f) for f in files):
        names = ", ".join(f.name for f in files)
        raise ConversionError(f"{folder}: several checkpoints ({names}): name the one to convert")
    return files


def _is_shard(file: Path) -> bool:
    return re.search(r"-\d+-of-\d+\.", file.name) is not None


def _read_weights(file: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of one file and the configuration a fairseq / torchscale pickle carries beside them."""
    if file.suffix == ".safetensors":
        try:
            return load_file(file), {}
        except Exception as e:
            raise ConversionError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from e
    if file.suffix not in PICKLE_SUFFIXES:
        raise ConversionError(f"{file}: unknown weight file type {file.suffix!r} (expected .safetensors, .pt or .bin)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # fairseq's "args": plain attributes
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it needs the code of {found.group(1)}" if found else str(e).splitlines()[0]
        raise ConversionError(
            f"{file}: cannot be read with torch.load(weights_only=True) ({reason}). "
            "It holds Python objects whose code would have to run to load it, which retentive never does. Where you "
            "trust the file, keep only its tensors and plain settings, e.g. in Python: ck = torch.load(path, "
            "weights_only=False); torch.save({'model': ck['model'], 'cfg': dict(ck['cfg']['model'])}, 'plain.pt') "
            "(for an omegaconf cfg: OmegaConf.to_container(ck['cfg']['model'])), then convert plain.pt."
        ) from e
    return _split_pickle(file, obj)


def _split_pickle(file: Path, obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, config) of a loaded pickle: a bare state dict, fairseq's {"model": ..., "cfg" | "args": ...}, or a
    trainer's {"model_ema": ...} or {"state_dict": ...}."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{file}: holds a {type(obj).__name__}, not a state dict or a fairseq checkpoint")
    config: dict[str, Any] = {}
    if not isinstance(obj.get("model"), dict):  # timm / DeiT-style trainers' other names for the weights
        obj = next((obj[k] for k in ("model_ema", "state_dict") if isinstance(obj.get(k), dict)), obj)
    if isinstance(obj.get("model"), dict):
        cfg = obj.get("cfg")
        settings = cfg.get("model") if isinstance(cfg, dict) else obj.get("args")
        if isinstance(settings, argparse.Namespace):
            settings = vars(settings)
        config = dict(settings) if isinstance(settings, dict) else {}
        obj = obj["model"]
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ConversionError(f"{file}: holds no tensors (expected a state dict, or fairseq's {{'model': ...}})")
    return state, config


def copy_tokenizer(source: Source, out: Path) -> list[str]:
    """Copy the tokenizer files of the source folder into ``out``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        file = source.folder / name
        if file.is_file():
            (out / name).write_bytes(file.read_bytes())
            copied.append(name)
    return copied


class Weights:
    """The source's tensors, taken one key at a time: a missing key or a wrong shape raises ConversionError naming
    the file and the key; :meth:`check_all_taken` refuses tensors no mapping used (options retentive lacks)."""

    def __init__(self, source: Source, ignore: tuple[str, ...] = ()) -> None:
        self.source = source
        self.left = {k for k in source.state if not any(re.search(p, k) for p in ignore)}

    def has(self, key: str) -> bool:
        return key in self.source.state

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> Tensor:
        """The tensor under ``key``, checked against ``shape`` (what the configuration implies)."""
        if key not in self.source.state:
            raise ConversionError(
                f"{self.source.where}: missing key {key!r}: the checkpoint is incomplete or not of this layout "
                "(download every weight file, or name the layout with --from)"
            )
        tensor = self.source.state[key]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ConversionError(
                f"{self.source.where}: {key!r} has shape {tuple(tensor.shape)} but the configuration implies "
                f"{tuple(shape)}: the configuration does not describe these weights (check config.json, or pass "
                "the source's settings with --source-config)"
            )
        self.left.discard(key)
        return tensor

    def layers(self, pattern: str) -> int:
        """How many layers ``pattern`` (a regex with one group, the layer index) numbers, checked to be 0..n-1."""
        found = {int(m.group(1)) for k in self.source.state if (m := re.match(pattern, k))}
        if not found or found != set(range(len(found))):
            raise ConversionError(
                f"{self.source.where}: layers numbered {sorted(found)[:8]} under {pattern!r}, expected 0..n-1: "
                "the checkpoint is incomplete or not of this layout"
            )
        return len(found)

    def check_all_taken(self) -> None:
        if self.left:
            keys = sorted(self.left)
            raise ConversionError(
                f"{self.source.where}: {len(keys)} tensor(s) that retentive has no place for, e.g. {keys[:4]}: the "
                "checkpoint uses an option retentive does not support (or is of another layout: see --from)"
            )


def match_schedule(log_decay: Tensor, num_heads: int) -> str | list[float]:
    """The decay schedule whose log-gammas a source stored (float32 in the sources), or the gammas themselves."""
    from ...ops import SCHEDULES, log_gamma

    stored = log_decay.double()
    for name in SCHEDULES:
        if torch.allclose(stored, log_gamma(name, num_heads), rtol=1e-5, atol=0):
            return name
    return [math.exp(x) for x in stored.tolist()]


def token_ids(settings: dict[str, Any], vocab_size: int) -> dict[str, int]:
    """pad, bos and eos ids of a source configuration that name tokens of the vocabulary."""
    ids = {}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = settings.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size:
            ids[name] = value
    return ids
