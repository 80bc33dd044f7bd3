"""Two processes with gloo on CPU take the same steps as one process with the doubled batch."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tinylm import TinyLM
from torch import nn

from retentive.data import TokenWindows
from retentive.training import TrainConfig, Trainer, init_distributed, seed_everything

STEPS, BATCH, SEQ_LEN = 5, 4, 16


def train_tiny(
    run_dir: Path,
    batch_size: int,
    parallel: str = "ddp",
    model_fn: Callable[[], nn.Module] = TinyLM,
    ckpt_interval: int = 0,
    resume: bool | Path = False,
    activation_checkpointing: bool = False,
) -> list[float]:
    """Train ``model_fn()`` for STEPS steps on random tokens (alone, or as one process of a group); the losses."""
    info = init_distributed("cpu")
    seed_everything(0)
    tokens = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)
    data = TokenWindows(tokens, SEQ_LEN, batch_size, seed=3, rank=info.rank, world_size=info.world_size)
    config = TrainConfig(
        steps=STEPS,
        lr=1e-2,
        warmup=1,
        grad_accum=2,
        ckpt_interval=ckpt_interval,
        progress=False,
        parallel=parallel,
        activation_checkpointing=activation_checkpointing,
    )
    return Trainer(model_fn(), data, config, run_dir, resume=resume, dist=info).fit().losses


def _worker(rank: int, world_size: int, port: int, out: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(out: Path, fn: Callable[..., Any], *args: Any, world_size: int = 2) -> Any:
    """Run ``fn(*args)`` in ``world_size`` gloo processes; process 0's result (JSON, kept in ``out``)."""
    mp.spawn(_worker, args=(world_size, _free_port(), str(out), fn, args), nprocs=world_size, join=True)
    return json.loads(out.read_text())


def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path: Path) -> None:
    ddp = run_gloo(tmp_path / "losses.json", train_tiny, tmp_path / "ddp", BATCH)
    single = train_tiny(tmp_path / "single", 2 * BATCH)
    assert len(ddp) == STEPS
    np.testing.assert_allclose(ddp, single, rtol=0, atol=1e-5)
    # the checkpoint of the distributed run holds one RNG state per process
    state = torch.load(tmp_path / "ddp" / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 2
