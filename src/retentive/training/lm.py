"""The language-model recipe: corpus -> tokenizer -> memory-mapped tokens -> RetNetForCausalLM -> Trainer.

One function, :func:`train_language_model`, used by ``retentive train`` and ``retentive demo``; it runs alone or
under ``torchrun`` (every process calls it; process 0 trains the tokenizer and writes the token files first).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import baselines
from ..data import (
    TOKENIZERS,
    ByteTokenizer,
    EvalWindows,
    Tokenizer,
    TokenSplits,
    TokenWindows,
    build_tokenizer,
    load_tokenizer,
    read_corpus,
)
from ..data.corpus import normalize_suffixes
from ..data.tokenizer import GPT2_VOCAB_SIZE, MIN_BPE_VOCAB
from ..data.tokens import tokenize_corpus
from ..models import RetNetConfig, RetNetForCausalLM
from .checkpoint import check_run_dir, prepare_run_dir
from .distributed import DistInfo, barrier, init_distributed
from .trainer import TrainConfig, Trainer, TrainResult, seed_everything

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where token files are cached: ``$RETENTIVE_CACHE`` or ``~/.cache/retentive/tokens``."""
    return Path(os.environ.get("RETENTIVE_CACHE", Path.home() / ".cache" / "retentive")) / "tokens"


@dataclass
class LMConfig:
    """What the language-model run trains on (the trainer's options are in :class:`TrainConfig`)."""

    preset: str = "retnet-tiny"  # a RetNetConfig preset, or "transformer-<size>" for its Llama twin (baselines)
    model_config: str | None = None  # a config.json (RetNetConfig) used instead of the preset
    model_overrides: dict[str, Any] = field(default_factory=dict)  # RetNetConfig fields to change
    data: str = "shakespeare"  # "shakespeare", a text file or folder, or "datasets:<glob>"
    suffixes: list[str] | None = None  # the file suffixes read from a folder; None: .txt, .md, .text
    tokenizer: str = "bpe"  # "bpe" (trained on the data), "gpt2" or "bytes"
    vocab_size: int = 4096  # for "bpe"
    seq_len: int = 128  # T: tokens per training window
    batch_size: int = 16  # windows per micro-batch on each process
    val_fraction: float = 0.05  # share of every document held out
    documents: bool = False  # read each document of a window on its own: positions restart after end-of-text
    eval_batches: int = 20  # validation batches per evaluation (per process)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the option that cannot work (before the run writes anything)."""
        for name in ("seq_len", "batch_size", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction (--val-fraction) must lie in [0, 1), got {self.val_fraction!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and self.vocab_size < MIN_BPE_VOCAB:
            raise ValueError(
                f"vocab_size (--vocab-size) must be >= {MIN_BPE_VOCAB} for a BPE (256 bytes, end-of-text, one merge), "
                f"got {self.vocab_size}"
            )
        if self.model_config is not None and not Path(self.model_config).is_file():
            raise FileNotFoundError(f"model config {self.model_config} (--config) does not exist")
        normalize_suffixes(self.suffixes)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for name, default in (("suffixes", None), ("documents", False)):
            if d[name] == default:  # run.json as before the option existed, so older runs resume
                del d[name]
        if d["data"] != "shakespeare" and not d["data"].startswith("datasets:"):
            d["data"] = str(Path(d["data"]).expanduser().resolve())
        return d


@dataclass
class LMRun:
    """A trained language model and what it was trained on."""

    model: RetNetForCausalLM
    tokenizer: Tokenizer
    splits: TokenSplits
    result: TrainResult
    trainer: Trainer


def build_model_config(lm: LMConfig, tokenizer: Tokenizer) -> RetNetConfig:
    """The model's config: the preset (or config file) with the overrides and the tokenizer's vocabulary."""
    overrides = _vocabulary(lm, tokenizer)
    if lm.model_config is not None:
        fields = json.loads(Path(lm.model_config).read_text())
        fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type", "transformers_version")}
        return RetNetConfig(**RetNetConfig.merge(fields, overrides))
    return RetNetConfig.from_preset(lm.preset, **overrides)


def _vocabulary(lm: LMConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The model overrides with the tokenizer's vocabulary size and its end-of-text id as EOS, BOS and pad token (as
    the saved tokenizer says: see :meth:`Tokenizer.save`)."""
    special = dict.fromkeys(("eos_token_id", "bos_token_id", "pad_token_id"), tokenizer.eos_id)
    return {**lm.model_overrides, "vocab_size": tokenizer.vocab_size, **special}


def _build_model(lm: LMConfig, tokenizer: Tokenizer) -> nn.Module:
    """RetNetForCausalLM, or the Transformer twin of a RetNet preset (``transformer-<size>``)."""
    if lm.preset.startswith(baselines.PREFIX) and lm.model_config is None:
        return baselines.transformer_from_preset(lm.preset, **_vocabulary(lm, tokenizer))
    return RetNetForCausalLM(build_model_config(lm, tokenizer))


def check_model_options(lm: LMConfig) -> None:
    """Build the model on the meta device with the vocabulary the tokenizer will have (nothing is allocated):
    a bad preset, config file or ``--set`` is refused before the run writes anything."""
    size = {"bytes": ByteTokenizer.vocab_size, "gpt2": GPT2_VOCAB_SIZE}.get(lm.tokenizer, lm.vocab_size)
    with torch.device("meta"):
        _build_model(lm, SimpleNamespace(vocab_size=size, eos_id=size - 1))


def _tokenizer(lm: LMConfig, docs: list[str], run_dir: Path, dist: DistInfo) -> Tokenizer:
    saved = run_dir / "tokenizer"
    if dist.is_main and not (saved / "tokenizer_meta.json").is_file():
        build_tokenizer(lm.tokenizer, docs, lm.vocab_size).save(saved)
    barrier(dist)
    return load_tokenizer(saved)  # every process (and a resumed run) uses the saved one


def train_language_model(
    lm: LMConfig,
    train: TrainConfig,
    run_dir: str | Path,
    resume: bool | str = False,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    stop_at: int | None = None,
) -> LMRun:
    """Train a RetNet language model on a text corpus.

    Args:
        lm: data, tokenizer and model options.
        train: the trainer's options.
        run_dir: the run directory (refused if it holds a different run, unless ``resume`` or ``overwrite``).
        resume: continue the run in ``run_dir`` (True) or from this checkpoint folder.
        overwrite: start afresh, deleting what ``run_dir`` holds.
        cache_dir: where token files are cached (default :func:`default_cache_dir`).
        stop_at: stop after this step (see :meth:`Trainer.fit`).
    """
    # Every option, the run directory, the data and the model are checked before anything is written, and by every
    # process before the process group forms: under torchrun all of them refuse alike, none waits on a dead peer.
    lm.validate()
    run_dir, run_config = Path(run_dir), {"lm": lm.to_dict(), "train": train.to_dict()}
    check_run_dir(run_dir, run_config, bool(resume), overwrite)
    docs = read_corpus(lm.data, lm.suffixes)
    check_model_options(lm)
    dist = init_distributed(train.device)
    if dist.is_main:
        prepare_run_dir(run_dir, run_config, bool(resume), overwrite)
    barrier(dist)
    tokenizer = _tokenizer(lm, docs, run_dir, dist)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if dist.is_main:
        splits = tokenize_corpus(docs, tokenizer, cache, lm.val_fraction)
    barrier(dist)
    if not dist.is_main:
        splits = tokenize_corpus(docs, tokenizer, cache, lm.val_fraction)
    del docs
    seed_everything(lm.seed)
    model = _build_model(lm, tokenizer)
    logger.info("%s: %s parameters", type(model).__name__, f"{baselines.count_parameters(model):,}")
    ranks = {"rank": dist.rank, "world_size": dist.world_size, "eos_id": tokenizer.eos_id if lm.documents else None}
    train_data = TokenWindows(splits.train, lm.seq_len, lm.batch_size, lm.seed, **ranks)
    val_data = None
    if len(splits.val) > lm.seq_len:
        val_data = EvalWindows(splits.val, lm.seq_len, lm.batch_size, lm.eval_batches, **ranks)
    trainer = Trainer(model, train_data, train, run_dir, val_data, save_extra=tokenizer.save, resume=resume, dist=dist)
    result = trainer.fit(stop_at=stop_at)
    return LMRun(model, tokenizer, splits, result, trainer)


def unigram_perplexity(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity on ``val_tokens`` of the unigram model of ``train_tokens`` (add-one smoothing).

    The baseline a language model must beat: what knowing only token frequencies gives.
    """
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[np.asarray(val_tokens, dtype=np.int64)].mean()))
