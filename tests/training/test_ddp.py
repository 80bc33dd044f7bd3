"""Two processes with gloo on CPU take the same steps as one process with the doubled batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tinylm import TinyLM

from retentive.data import TokenWindows
from retentive.training import TrainConfig, Trainer, init_distributed, seed_everything

STEPS, BATCH, SEQ_LEN = 5, 4, 16


def _train(run_dir: Path, batch_size: int) -> list[float]:
    info = init_distributed("cpu")
    seed_everything(0)
    tokens = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)
    data = TokenWindows(tokens, SEQ_LEN, batch_size, seed=3, rank=info.rank, world_size=info.world_size)
    config = TrainConfig(steps=STEPS, lr=1e-2, warmup=1, grad_accum=2, ckpt_interval=0, progress=False)
    return Trainer(TinyLM(), data, config, run_dir, dist=info).fit().losses


def _worker(rank: int, world_size: int, port: int, run_dir: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    try:
        losses = _train(Path(run_dir), BATCH)
        if rank == 0:
            Path(run_dir, "losses.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    single = _train(tmp_path / "single", 2 * BATCH)
    assert len(ddp) == STEPS
    np.testing.assert_allclose(ddp, single, rtol=0, atol=1e-5)
    # the checkpoint of the distributed run holds one RNG state per process
    state = torch.load(tmp_path / "ddp" / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 2
