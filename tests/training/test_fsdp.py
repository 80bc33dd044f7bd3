"""FSDP2 with gloo on CPU: two sharded processes take the same steps as one process with the doubled batch, write
the same (full) checkpoints, resume exactly, and recompute checkpointed blocks' activations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from test_ddp import BATCH, STEPS, run_gloo, train_tiny

from retentive.models import RetNetConfig, RetNetForCausalLM

RESUME_AT = 3


def _tiny_retnet() -> RetNetForCausalLM:
    """Two RetNet blocks (two FSDP units) and tied embeddings (in the root unit)."""
    return RetNetForCausalLM(RetNetConfig(vocab_size=64, dim_model=16, num_layers=2, num_heads=2))


def _fsdp_runs(root: Path) -> dict[str, list[float]]:
    full = train_tiny(root / "full", BATCH, "fsdp", _tiny_retnet, ckpt_interval=RESUME_AT)
    ckpt = root / "full" / "checkpoints" / f"step-{RESUME_AT:08d}"
    resumed = train_tiny(root / "resumed", BATCH, "fsdp", _tiny_retnet, resume=ckpt)
    return {"full": full, "resumed": resumed}


def _checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    return load_file(ckpt / "model.safetensors"), torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]


def test_fsdp_matches_one_process_and_resumes(tmp_path: Path) -> None:
    fsdp = run_gloo(tmp_path / "losses.json", _fsdp_runs, tmp_path)
    single = train_tiny(tmp_path / "single", 2 * BATCH, model_fn=_tiny_retnet)
    assert len(fsdp["full"]) == STEPS
    np.testing.assert_allclose(fsdp["full"], single, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fsdp["resumed"], fsdp["full"][RESUME_AT:], rtol=0, atol=1e-6)
    # the checkpoint holds the full weights and optimizer state, in the format of the unsharded run
    (w_fsdp, opt_fsdp), (w_single, opt_single) = _checkpoint(tmp_path / "full"), _checkpoint(tmp_path / "single")
    assert w_fsdp.keys() == w_single.keys()
    for name, w in w_single.items():
        torch.testing.assert_close(w_fsdp[name], w, rtol=0, atol=1e-5)
    assert opt_fsdp["param_groups"] == opt_single["param_groups"]
    assert opt_fsdp["state"].keys() == opt_single["state"].keys()
    for i, state in opt_single["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(opt_fsdp["state"][i][key], value, rtol=1e-4, atol=1e-6)


def _fsdp_checkpointed(run_dir: Path) -> list[float]:
    return train_tiny(run_dir, BATCH, "fsdp", _tiny_retnet, activation_checkpointing=True)


def test_fsdp_with_activation_checkpointing_takes_the_steps_of_one_process(tmp_path: Path) -> None:
    """Each sharded block checkpointed: the recomputation gathers its weights again, and the steps stay the same."""
    fsdp = run_gloo(tmp_path / "losses.json", _fsdp_checkpointed, tmp_path / "fsdp")
    single = train_tiny(tmp_path / "single", 2 * BATCH, model_fn=_tiny_retnet)
    np.testing.assert_allclose(fsdp, single, rtol=0, atol=1e-5)
