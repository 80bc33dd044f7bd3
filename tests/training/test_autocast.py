"""Training under CPU autocast bf16 (``--precision bf16``): a step stays near the float32 one, and the command runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from retentive.cli import main
from retentive.data import read_corpus
from retentive.models import RetNetConfig, RetNetForCausalLM
from retentive.models.vir import ViRConfig, ViRForImageClassification

TINY = {"dim_model": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64}


def _model_and_batch(kind: str) -> tuple[torch.nn.Module, dict]:
    """A tiny RetNet language model (the parallel or the chunkwise form) or ViR, and a batch for it."""
    gen = torch.Generator().manual_seed(0)
    if kind == "vir":
        model = ViRForImageClassification(ViRConfig.from_preset("vir-tiny-32"))
        return model, {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen), "labels": torch.tensor([1, 2])}
    config = RetNetConfig.from_preset("retnet-tiny", vocab_size=64, mode=kind, chunk_size=8, **TINY)
    ids = torch.randint(0, 64, (2, 20), generator=gen)
    return RetNetForCausalLM(config), {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("kind", ["parallel", "chunkwise", "vir"])
def test_a_training_step_under_cpu_autocast_stays_near_float32(kind):
    """Loss and every gradient of one step (forward under autocast, backward after it, as the trainer runs it)
    within bf16 rounding of the float32 step: relative error < 5e-2 per parameter (about 1e-2 measured)."""
    torch.manual_seed(0)
    model, batch = _model_and_batch(kind)
    steps = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        steps.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss32, grads32), (loss16, grads16) = steps
    assert math.isfinite(loss16) and abs(loss16 - loss32) < 1e-2 * abs(loss32)
    for name, want in grads32.items():
        got = grads16[name]
        assert got.isfinite().all(), name
        assert (got - want).norm() < 5e-2 * want.norm(), name


def test_train_with_bf16_precision_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``retentive train --precision bf16 --device cpu``: a few steps, finite losses."""
    monkeypatch.setenv("RETENTIVE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(read_corpus("shakespeare")[0][:20_000])
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    main(
        ["train", "--data", str(text), "--out", str(tmp_path / "run"), "--tokenizer", "bytes", "--steps", "3",
         "--seq-len", "32", "--batch-size", "4", "--warmup", "1", "--eval-interval", "3", "--eval-batches", "1",
         "--ckpt-interval", "3", "--precision", "bf16", "--device", "cpu", "--no-progress", *sets]
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3
    assert all(math.isfinite(r["loss"]) for r in records) and math.isfinite(records[-1]["val_loss"])
