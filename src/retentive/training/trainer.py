"""A model-agnostic trainer: any ``nn.Module`` whose ``forward(**batch)`` returns an object with ``.loss``.

It gives AdamW (decay on matrices) with warm-up + cosine, gradient clipping and accumulation, bf16 autocast on CUDA
(float32 on CPU unless asked), optional ``torch.compile`` and activation checkpointing, an optional moving average
of the weights (EMA), evaluation, a tqdm bar, ``metrics.jsonl`` + ``loss.png``, atomic checkpoints (weights, EMA
weights, optimizer, scheduler, RNG, data position, step) and an exact resume, under ``torchrun`` with
DistributedDataParallel or FSDP2 (``parallel="fsdp"``) as well as alone.

The training data is any object with ``next_batch() -> dict[str, Tensor]``, ``state_dict()`` and
``load_state_dict()`` (e.g. :class:`retentive.data.TokenWindows`, :class:`retentive.data.TensorBatches`); the
validation data any re-iterable of such batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from .checkpoint import (
    EMA_WEIGHTS,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_dirs,
    load_trainer_state,
    load_weights,
    remove_stale_temporaries,
    resolve_checkpoint,
    save_checkpoint,
    save_weights,
)
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed
from .ema import ModelEMA
from .fsdp import full_state_dicts, load_optimizer_state, shard_model
from .log import MetricsLog
from .optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

Batch = dict[str, Any]  # the model's keyword arguments: tensors (moved to the device), options such as use_cache
MetricsFn = Callable[[Any, Batch], dict[str, float]]


class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    """The trainer's options (all recorded in the run's ``run.json``)."""

    steps: int = 1000  # optimizer steps in total (with time_budget: the first estimate)
    time_budget: float | None = None  # seconds of training: the step count is re-fitted to it while training
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate / peak, at the end of the cosine
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.05  # on 2-D+ parameters only (the paper: 0.05)
    betas: tuple[float, float] = (0.9, 0.98)  # the paper's Adam betas
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    ema_decay: float = 0.0  # a moving average of the weights, evaluated beside them (0: none; timm: 0.9998)
    eval_interval: int = 200  # steps between evaluations (and one at the end)
    ckpt_interval: int = 500  # steps between checkpoints (and one at the end); 0: only at the end
    keep_last: int = 3  # checkpoints kept
    log_interval: int = 10  # steps between metrics.jsonl records
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16"
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block's activations in the backward instead of keeping them
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    parallel: str = "ddp"  # under torchrun: "ddp" (replicate the model) or "fsdp" (shard it with FSDP2)
    perplexity: bool = True  # report exp(val_loss) (language models)
    progress: bool = True  # the tqdm bar

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "keep_last", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_interval", "ckpt_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1) (0: no moving average), got {self.ema_decay}")
        if self.ema_decay and self.parallel == "fsdp":
            raise ValueError("ema_decay needs the whole model on each process: use parallel='ddp' with it")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be None or > 0 seconds, got {self.time_budget}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("ema_decay", "activation_checkpointing"):  # at their defaults: run.json as before they existed,
            if not d[name]:  # so older runs resume
                del d[name]
        return d


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        losses: the training loss of every step taken in this call (mean over processes and micro-batches).
        eval: the last evaluation (``val_loss``, ``val_ppl``, metrics), empty without validation data.
        checkpoint: the last checkpoint written.
        seconds: wall time of the training loop.
    """

    losses: list[float] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (call before building the model)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"]},
        "numpy_extra": [np_state["has_gauss"], np_state["gauss"]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy"]["key"].numpy().astype(np.uint32), "pos": state["numpy"]["pos"]},
            "has_gauss": state["numpy_extra"][0],
            "gauss": state["numpy_extra"][1],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Have ``model`` recompute its blocks' activations in the backward pass instead of keeping them:
    transformers' ``activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` before 5.25), or timm's
    ``set_grad_checkpointing()``; non-reentrant, as ``torch.utils.checkpoint`` recommends."""
    hf = getattr(model, "activation_checkpointing_enable", None)
    hf = hf or getattr(model, "gradient_checkpointing_enable", None)
    if hf is None and not hasattr(model, "set_grad_checkpointing"):
        raise ValueError(
            f"activation_checkpointing: {type(model).__name__} has neither transformers' "
            "activation_checkpointing_enable nor timm's set_grad_checkpointing: train it with "
            "activation_checkpointing=False"
        )
    if hf is None:
        model.set_grad_checkpointing(True)
        return
    try:
        hf({"use_reentrant": False})
    except ValueError as e:  # a PreTrainedModel that does not support it
        raise ValueError(f"activation_checkpointing: {e} Train it with activation_checkpointing=False") from e


class Trainer:
    """Train ``model`` on ``train_data``, evaluate on ``val_data``, checkpoint into ``run_dir``.

    Args:
        model: ``forward(**batch)`` returns an object with ``.loss`` (and optionally ``.logits``).
        train_data: a :class:`BatchSource` for this process (its batches are per micro-step and per rank).
        config: the :class:`TrainConfig`.
        run_dir: the run directory (prepared by :func:`retentive.training.prepare_run_dir`).
        val_data: re-iterable batches for evaluation (per rank), or None.
        metrics_fn: ``metrics_fn(output, batch) -> {name: value}``, averaged over the evaluation batches
            (e.g. accuracy for a classifier).
        save_extra: writes extra files into each checkpoint folder (e.g. the tokenizer).
        resume: continue from the newest intact checkpoint of ``run_dir`` (or from this checkpoint folder).
        dist: the process group info (default: :func:`init_distributed` with ``config.device``).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: BatchSource,
        config: TrainConfig,
        run_dir: str | Path,
        val_data: Iterable[Batch] | None = None,
        metrics_fn: MetricsFn | None = None,
        save_extra: Callable[[Path], None] | None = None,
        resume: bool | str | Path = False,
        dist: DistInfo | None = None,
    ) -> None:
        self.config, self.run_dir = config, Path(run_dir)
        self.dist = dist or init_distributed(config.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        if config.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.train_data, self.val_data = train_data, val_data
        self.metrics_fn, self.save_extra = metrics_fn, save_extra
        self.fsdp = config.parallel == "fsdp" and self.dist.distributed
        if self.dist.is_main:
            remove_stale_temporaries(self.run_dir)  # what interrupted checkpoint writes left
        ckpt = self._find_checkpoint(resume) if resume else None
        if ckpt is not None:
            load_weights(self.model, ckpt)  # the full weights, before sharding
        self.ema = ModelEMA(self.model, config.ema_decay) if config.ema_decay else None
        if self.fsdp:
            shard_model(self.model, self.dist)  # in place: the optimizer must see the sharded parameters
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay, config.betas)
        self.total_steps = config.steps  # the schedule's length; fitted to config.time_budget while training
        self.scheduler = build_scheduler(self.optimizer, config.warmup, lambda: self.total_steps, config.min_lr_ratio)
        self.step = 0
        self.unit = "tok/s"
        self.resumed_from = self._resume(ckpt) if ckpt is not None else None
        self.train_model = self._wrap(self.model)
        self.log = MetricsLog(self.run_dir, self.step if self.resumed_from else None) if self.dist.is_main else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        bf16 = self.config.precision == "bf16" or (
            self.config.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        if not bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.distributed and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.config.compile:
            model = torch.compile(model)
        return model

    def _find_checkpoint(self, resume: bool | str | Path) -> Path | None:
        if resume is True and not checkpoint_dirs(self.run_dir):
            logger.info("no checkpoint in %s yet: starting afresh", self.run_dir)
            return None
        return resolve_checkpoint(self.run_dir if resume is True else Path(resume))

    def _resume(self, ckpt: Path) -> Path:
        """Restore the optimizer, scheduler, data position, step and RNG (the weights are loaded already)."""
        state = load_trainer_state(ckpt)
        if self.fsdp:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_data.load_state_dict(state["data"])
        if self.ema is not None:
            if not (ckpt / EMA_WEIGHTS).is_file():
                raise CheckpointError(f"{ckpt / EMA_WEIGHTS} is missing: that run kept no moving average (ema_decay)")
            self.ema.load(ckpt / EMA_WEIGHTS)
        self.step = int(state["step"])
        if self.config.time_budget is not None:  # the length fitted so far; otherwise config.steps (a run may grow)
            self.total_steps = int(state.get("total_steps", self.config.steps))
        rng = state["rng"]
        if len(rng) != self.dist.world_size:
            logger.warning("checkpoint has RNG states of %d processes, this run has %d", len(rng), self.dist.world_size)
        _set_rng_state(rng[self.dist.rank % len(rng)])
        logger.info("resumed from %s at step %d", ckpt, self.step)
        return ckpt

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _train_step(self) -> tuple[float, float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, grad norm, items processed)."""
        self.train_model.train()
        accum, total, items = self.config.grad_accum, torch.zeros((), device=self.device), 0
        for micro in range(accum):
            batch = self._to_device(self.train_data.next_batch())
            tokens = "input_ids" in batch  # language models count tokens, other models samples
            items += batch["input_ids"].numel() if tokens else len(next(iter(batch.values())))
            self.unit = "tok/s" if tokens else "samples/s"
            sync = micro == accum - 1 or not self.dist.distributed
            if self.fsdp:  # FSDP2 has no no_sync(): reduce-scatter the gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or self.fsdp else self.train_model.no_sync(), self._autocast():
                loss = self.train_model(**batch).loss / accum
            loss.backward()
            total += loss.detach()
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards, replicated
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        loss_sum, items_sum = all_reduce_sum([total.item(), float(items)], self.dist)
        return loss_sum / self.dist.world_size, float(grad_norm), int(items_sum)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss (and metrics) over the validation batches of every process; ``val_ppl`` = exp(loss). With a
        moving average, the same of the averaged weights (``val_ema_loss``, ...), in the same pass over the data."""
        if self.val_data is None:
            return {}
        models = {"val_": self.model} | ({"val_ema_": self.ema.module} if self.ema is not None else {})
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0
        for batch in self.val_data:
            batch = self._to_device(batch)
            n = len(next(iter(batch.values())))
            for prefix, model in models.items():
                with self._autocast():
                    out = model(**batch)
                metrics = {"loss": out.loss.float().item(), **(self.metrics_fn(out, batch) if self.metrics_fn else {})}
                for k, v in metrics.items():
                    sums[prefix + k] = sums.get(prefix + k, 0.0) + float(v) * n
            count += n
        keys = sorted(sums)
        totals = all_reduce_sum([sums[k] for k in keys] + [float(count)], self.dist)
        result = {k: v / max(totals[-1], 1) for k, v in zip(keys, totals[:-1], strict=True)}
        if self.config.perplexity:
            for prefix in models:
                result[prefix + "ppl"] = math.exp(min(result[prefix + "loss"], 50.0))
        return result

    def save(self) -> Path:
        """Write a checkpoint of the current step (every process must call it; process 0 writes)."""
        rng = all_gather_objects(_rng_state(), self.dist)
        weights, optimizer = full_state_dicts(self.model, self.optimizer) if self.fsdp else (None, None)
        path = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        if self.dist.is_main:
            state = {
                "optimizer": optimizer if self.fsdp else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "data": self.train_data.state_dict(),
                "rng": rng,
                "step": self.step,
                "total_steps": self.total_steps,
            }

            def write(directory: Path) -> None:
                save_weights(self.model, directory, weights)
                if self.ema is not None:
                    self.ema.save(directory / EMA_WEIGHTS)
                torch.save(state, directory / TRAINER_STATE)
                (directory / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
                if self.save_extra is not None:
                    self.save_extra(directory)

            path = save_checkpoint(self.run_dir, self.step, write, self.config.keep_last)
            logger.info("checkpoint %s", path)
        barrier(self.dist)
        return path

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until the schedule's last step; evaluate and checkpoint on the way and at the end.

        The schedule has ``config.steps`` steps, or, with ``config.time_budget``, as many as fit in the budget:
        until 90% of the budget is spent the count is re-fitted after every step from the time per step of the
        latest half of the steps (see :meth:`_fit_to_budget`).

        Args:
            stop_at: stop after this step, as an interruption would (no extra checkpoint); the schedule still
                runs to its last step.
        """
        cfg, result = self.config, TrainResult()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        step_ends: list[float] = []  # when each step of this call ended (budgeted runs)
        while self.step < (self.total_steps if stop_at is None else min(stop_at, self.total_steps)):
            t0 = time.perf_counter()
            loss, grad_norm, items = self._train_step()
            now = time.perf_counter()
            rate = items / max(now - t0, 1e-9)
            if cfg.time_budget is not None:
                step_ends.append(now)
                self._fit_to_budget(now - start, step_ends)
                bar.total = self.total_steps
            last = self.step == self.total_steps
            result.losses.append(loss)
            bar.set_postfix({"loss": f"{loss:.3f}", self.unit: f"{rate:,.0f}"}, refresh=False)
            bar.update(1)
            record: dict[str, Any] = {}
            if self.step % cfg.log_interval == 0 or last:
                lr = self.scheduler.get_last_lr()[0]
                record |= {"loss": loss, "lr": lr, "grad_norm": grad_norm, self.unit.replace("/", "_per_"): rate}
            if self.val_data is not None and (last or (cfg.eval_interval and self.step % cfg.eval_interval == 0)):
                result.eval = self.evaluate()
                record |= result.eval
                if self.dist.is_main and cfg.progress:
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.eval.items()))
            if record and self.log is not None:
                self.log.write({"step": self.step, **record, "time_s": round(time.perf_counter() - start, 3)})
            if last or (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0):
                result.checkpoint = self.save()
                if self.log is not None:
                    self.log.plot()
        bar.close()
        if result.checkpoint is None:  # resumed at the end, or stopped early: the newest checkpoint
            result.checkpoint = self.resumed_from
        result.seconds = time.perf_counter() - start
        return result

    def _fit_to_budget(self, elapsed: float, step_ends: list[float]) -> None:
        """Re-fit ``total_steps`` to ``config.time_budget`` from the time per step over the latest half of the steps
        (the first step, which pays one-time costs, left out), until 90% of the budget is spent: the machine's speed
        may change under the run (the processes agree on the mean of their estimates)."""
        budget = self.config.time_budget
        if len(step_ends) < 2 or elapsed > 0.9 * budget:
            return
        window = max(1, (len(step_ends) - 1) // 2)  # steps in the latest half
        per_step = (step_ends[-1] - step_ends[-1 - window]) / window
        (remaining,) = all_reduce_sum([(budget - elapsed) / per_step], self.dist)
        self.total_steps = self.step + max(1, round(remaining / self.dist.world_size))
