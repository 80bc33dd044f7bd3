"""Put the parts together: load a run or checkpoint, build the engine and the app, run it under uvicorn."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI
from torch import nn

from ..data import Tokenizer, load_tokenizer
from ..models import RetNetForCausalLM
from .app import ServerLimits, create_app
from .backends import backend_for
from .engine import Engine
from .prefix_cache import PrefixCache, model_fingerprint
from .transformers_engine import TransformersEngine

logger = logging.getLogger(__name__)

MiB = 2**20
ENGINES = ("retentive", "transformers")


@dataclass
class ServeConfig:
    """How the server schedules and caches.

    Attributes:
        max_batch: sequences decoding at once (one state slot each).
        max_queue: requests waiting for a slot; beyond it the server answers 429.
        prefill_chunk: prompt tokens read per scheduler iteration, between two decode steps.
        prompt_cache_mib: the in-memory budget of the prompt-state cache (0: no cache).
        prompt_cache_dir: where evicted cache entries are written as safetensors (None: dropped).
        prompt_cache_disk_mib: the on-disk budget.
        cache_block: also cache the state every this many prompt tokens (0: only at message ends and prompt ends).
        limits: what one request may ask for.
        api_key: the key every request but ``/health`` must carry (``Authorization: Bearer KEY``); None: none.
        engine: "retentive" (this package's engine, any model) or "transformers" (transformers' own continuous
            batching, for a Transformer: greedy only; a prompt cache of more than 0 MiB turns its prefix sharing on,
            and ``prompt_cache_dir`` and ``cache_block`` do not apply).
    """

    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 512
    prompt_cache_mib: float = 256
    prompt_cache_dir: str | None = None
    prompt_cache_disk_mib: float = 1024
    cache_block: int = 0
    limits: ServerLimits | None = None
    api_key: str | None = None
    engine: str = "retentive"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "transformers" and (self.prompt_cache_dir is not None or self.cache_block):
            raise ValueError(
                "prompt_cache_dir and cache_block are options of the retentive engine: leave them unset with "
                "engine='transformers' (its prefix sharing keeps cache blocks in memory only)"
            )


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """The model and tokenizer of a run directory (its newest checkpoint), a checkpoint folder, or a folder written
    by ``save_pretrained`` with a tokenizer saved beside it (``tokenizer_meta.json`` there or in ``tokenizer/``).

    A RetNet checkpoint gives a :class:`RetNetForCausalLM`; a ``transformer-*`` one, its ``LlamaForCausalLM``.
    A checkpoint with a manifest (one written by training) is verified against it first, whichever folder is given.

    Raises:
        CheckpointError: a file of the checkpoint is missing or differs from its manifest's SHA-256.
    """
    from transformers import AutoModelForCausalLM

    from .. import models  # noqa: F401  (registers the RetNet with the Auto classes)
    from ..training import resolve_checkpoint
    from ..training.checkpoint import MANIFEST

    path = Path(path)
    plain = (path / "config.json").is_file() and not (path / MANIFEST).is_file()  # save_pretrained's folder
    ckpt = path if plain else resolve_checkpoint(path, use="retentive serve {}")
    for place in (ckpt, ckpt / "tokenizer", path / "tokenizer"):
        if (place / "tokenizer_meta.json").is_file():
            tokenizer = load_tokenizer(place)
            break
    else:
        raise FileNotFoundError(
            f"no tokenizer beside {ckpt}: expected tokenizer_meta.json there or in a tokenizer/ folder "
            "(save one with retentive.data.build_tokenizer(...).save(folder))"
        )
    model_type = json.loads((ckpt / "config.json").read_text()).get("model_type")
    logger.info("loading %s (%s)", ckpt, model_type)
    model = AutoModelForCausalLM.from_pretrained(ckpt).to(device).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer of {ckpt} has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}"
        )
    return model, tokenizer


def compile_decoding(model: nn.Module, max_batch: int, implementation: str = "compiled") -> float | None:
    """Compile a RetNet's decoding step before the first request (``decode_implementation`` "compiled", "aot" or
    "native"), at batch 1 and 2, after which every batch size re-uses it; returns the seconds it took, or None where
    there was nothing to compile (a Transformer) or compiling failed (no C++ compiler, an unsupported platform):
    then the eager step serves, after a warning."""
    if not hasattr(model, "warm_up_decoding"):
        return None
    model.config.decode_implementation = implementation
    try:
        return model.warm_up_decoding(range(1, min(2, max_batch) + 1))
    except Exception as err:  # the eager step is exact and always works: serve with it rather than not at all
        model.config.decode_implementation = "eager"
        logger.warning("compiling the decoding step failed, serving the eager one: %s: %s", type(err).__name__, err)
        return None


def build_app(model: nn.Module, tokenizer: Tokenizer, model_name: str, config: ServeConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``model`` (RetNet or a key-value-cache causal LM) as ``model_name``, on
    this package's engine or on transformers' continuous batching (``config.engine``)."""
    config = config or ServeConfig()
    limits = config.limits or ServerLimits()
    if not isinstance(model, RetNetForCausalLM) and limits.max_context is None:
        limits.max_context = getattr(model.config, "max_position_embeddings", None)
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else getattr(tokenizer, "eos_id", None)
    if config.engine == "transformers":
        context = limits.max_prompt_tokens + limits.max_tokens
        engine = TransformersEngine(
            model, tokenizer, eos, max_batch=config.max_batch, max_queue=config.max_queue,
            prefill_chunk=config.prefill_chunk, max_context=min(context, limits.max_context or context),
            prefix_sharing=config.prompt_cache_mib > 0,
        )  # fmt: skip
        return create_app(engine, tokenizer, model_name, limits, config.api_key)
    backend = backend_for(model, config.max_batch)
    cache = None
    if config.prompt_cache_mib > 0:
        with torch.inference_mode():
            fingerprint = model_fingerprint(model)
        cache = PrefixCache(
            fingerprint,
            int(config.prompt_cache_mib * MiB),
            config.prompt_cache_dir,
            int(config.prompt_cache_disk_mib * MiB),
        )
    engine = Engine(
        backend,
        tokenizer,
        eos,
        max_queue=config.max_queue,
        prefill_chunk=config.prefill_chunk,
        prefix_cache=cache,
        cache_block=config.cache_block,
    )
    return create_app(engine, tokenizer, model_name, limits, config.api_key)


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30) -> None:
    """Serve ``app`` with uvicorn until SIGTERM or SIGINT: then stop accepting connections, let the running requests
    finish for up to ``shutdown_timeout`` seconds, cancel what is left, and return."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
