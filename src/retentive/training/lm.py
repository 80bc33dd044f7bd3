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
from typing import Any

import numpy as np

from .. import baselines
from ..data import EvalWindows, Tokenizer, TokenSplits, TokenWindows, build_tokenizer, load_tokenizer, read_corpus
from ..data.tokens import tokenize_corpus
from ..models import RetNetConfig, RetNetForCausalLM
from ..models.configuration_retnet import merge_fields
from .checkpoint import prepare_run_dir
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
    tokenizer: str = "bpe"  # "bpe" (trained on the data), "gpt2" or "bytes"
    vocab_size: int = 4096  # for "bpe"
    seq_len: int = 128  # T: tokens per training window
    batch_size: int = 16  # windows per micro-batch on each process
    val_fraction: float = 0.05  # share of every document held out
    eval_batches: int = 20  # validation batches per evaluation (per process)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
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
    overrides = {**lm.model_overrides, "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id}
    if lm.model_config is not None:
        fields = json.loads(Path(lm.model_config).read_text())
        fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type", "transformers_version")}
        return RetNetConfig(**merge_fields(fields, overrides))
    return RetNetConfig.from_preset(lm.preset, **overrides)


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
    dist = init_distributed(train.device)
    run_dir = Path(run_dir)
    if dist.is_main:
        prepare_run_dir(run_dir, {"lm": lm.to_dict(), "train": train.to_dict()}, bool(resume), overwrite)
    barrier(dist)
    docs = read_corpus(lm.data)
    tokenizer = _tokenizer(lm, docs, run_dir, dist)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if dist.is_main:
        splits = tokenize_corpus(docs, tokenizer, cache, lm.val_fraction)
    barrier(dist)
    if not dist.is_main:
        splits = tokenize_corpus(docs, tokenizer, cache, lm.val_fraction)
    del docs
    seed_everything(lm.seed)
    if lm.preset.startswith(baselines.PREFIX) and lm.model_config is None:  # the Transformer twin of a RetNet preset
        overrides = {**lm.model_overrides, "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id}
        model = baselines.transformer_from_preset(lm.preset, **overrides)
    else:
        model = RetNetForCausalLM(build_model_config(lm, tokenizer))
    logger.info("%s: %s parameters", type(model).__name__, f"{baselines.count_parameters(model):,}")
    train_data = TokenWindows(splits.train, lm.seq_len, lm.batch_size, lm.seed, dist.rank, dist.world_size)
    val_data = None
    if len(splits.val) > lm.seq_len:
        val_data = EvalWindows(splits.val, lm.seq_len, lm.batch_size, lm.eval_batches, dist.rank, dist.world_size)
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
