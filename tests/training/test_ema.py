"""The moving average of the weights: its update against the formula, and the trainer keeping, evaluating,
checkpointing and resuming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tinylm import TinyLM
from torch import nn

from retentive.data import EvalWindows, TokenWindows
from retentive.training import ModelEMA, TrainConfig, Trainer, seed_everything


def test_update_follows_the_formula():
    """ema_t = decay * ema_{t-1} + (1 - decay) * w_t from the weights it was made with; integer buffers copied;
    a weight tied to another averaged once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 7))
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    for net in (model, tied):
        ema = ModelEMA(net, decay=0.75)
        reference = {k: v.double().clone() for k, v in net.state_dict().items()}
        for _ in range(4):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p))
            if isinstance(net[1], nn.BatchNorm1d):
                net.train()(torch.randn(9, 5))  # moves the running statistics and counts the batch
            ema.update(net)
            for k, v in net.state_dict().items():
                reference[k] = 0.75 * reference[k] + 0.25 * v.double() if v.is_floating_point() else v.double()
        averaged = ema.module.state_dict()
        for k, v in reference.items():
            torch.testing.assert_close(averaged[k].double(), v, rtol=1e-6, atol=1e-6, msg=k)
        assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    assert averaged["1.weight"].data_ptr() == averaged["0.weight"].data_ptr(), "still tied"


def test_decay_is_checked():
    with pytest.raises(ValueError, match=r"ema_decay must lie in \(0, 1\)"):
        ModelEMA(nn.Linear(2, 2), 1.0)
    with pytest.raises(ValueError, match=r"ema_decay must lie in \[0, 1\)"):
        TrainConfig(ema_decay=-0.1)
    with pytest.raises(ValueError, match="ema_decay needs the whole model"):
        TrainConfig(ema_decay=0.9, parallel="fsdp")
    assert "ema_decay" not in TrainConfig().to_dict(), "run.json as before the option, so older runs resume"
    assert TrainConfig(ema_decay=0.9).to_dict()["ema_decay"] == 0.9


def _trainer(run_dir: Path, resume: bool = False) -> Trainer:
    seed_everything(0)
    tokens = (np.arange(3000) % 64).astype(np.uint16)
    config = TrainConfig(steps=6, lr=1e-2, warmup=1, eval_interval=3, ckpt_interval=3, ema_decay=0.8, progress=False)
    return Trainer(
        TinyLM(dropout=0.1),
        TokenWindows(tokens, seq_len=16, batch_size=4, seed=1),
        config,
        run_dir,
        val_data=EvalWindows(tokens[-600:], seq_len=16, batch_size=4, max_batches=2),
        resume=resume,
    )


def test_trainer_evaluates_checkpoints_and_resumes_the_average(tmp_path):
    straight = _trainer(tmp_path / "a")
    result = straight.fit()
    assert {"val_ema_loss", "val_ema_ppl", "val_loss", "val_ppl"} <= result.eval.keys()
    assert result.eval["val_ema_loss"] != result.eval["val_loss"]
    _trainer(tmp_path / "b").fit(stop_at=4)  # dies after step 4: the step-3 checkpoint remains
    resumed = _trainer(tmp_path / "b", resume=True)
    assert resumed.step == 3
    resumed.fit()
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints" / "step-00000006" / name) for run in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    average = load_file(tmp_path / "a" / "checkpoints" / "step-00000006" / "ema.safetensors")
    assert all(torch.equal(average[k], v) for k, v in straight.ema.module.state_dict().items())
    assert not torch.equal(average["head.weight"], straight.model.head.weight)
