"""Checkpoints written atomically, verified on load, kept last-k; the guard that keeps one run per directory.

A run directory holds ``run.json`` (the run's configuration) and ``checkpoints/step-XXXXXXXX/``. A checkpoint is
written into a hidden temporary folder, every file and the folder fsync'ed, then renamed into place with
``os.replace``: a crash leaves either the whole checkpoint or none. ``manifest.json`` records each file's size and
SHA-256, so a damaged file is named on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .._fsync import fsync_path

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"  # the moving average of the weights, when the run keeps one
TRAINER_STATE = "trainer_state.pt"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(root.glob("step-*")) if root.is_dir() else []


def save_checkpoint(
    run_dir: str | Path, step: int, write: Callable[[Path], None], keep_last: int | None = None
) -> Path:
    """Write a checkpoint atomically and prune old ones.

    Args:
        run_dir: the run directory.
        step: the optimizer steps taken; names the checkpoint ``step-XXXXXXXX``.
        write: fills the (temporary) folder it is given with the checkpoint's files.
        keep_last: keep this many newest checkpoints (None: all).

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=2) + "\n")
    for p in [*files, tmp / MANIFEST, *(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
        fsync_path(p)
    if final.exists():  # the same step written again (e.g. after a resume): move the old one out of the way first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    fsync_path(root)
    if keep_last is not None:
        for stale in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(stale)
    return final


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest.

    Returns:
        The manifest.

    Raises:
        CheckpointError: naming the missing, truncated or damaged file.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint file {manifest_path} is corrupt: {e}") from e
    for name, entry in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt (size or SHA-256 differs from {manifest_path})")
    return manifest


def resolve_checkpoint(path: str | Path, use: str = "pass it with --resume {}") -> Path:
    """The checkpoint to load from a checkpoint folder or a run directory (its newest checkpoint), verified.

    Args:
        path: a checkpoint folder or a run directory.
        use: how the caller's user passes another checkpoint, with ``{}`` for its path (the hint of the error).

    Raises:
        CheckpointError: no checkpoint there, or the chosen one is damaged: the message names the file and, for a run
            directory, the newest intact checkpoint to use instead.
    """
    path = Path(path)
    if (path / MANIFEST).is_file() or path.name.startswith("step-"):
        verify_checkpoint(path)
        return path
    ckpts = checkpoint_dirs(path)
    if not ckpts:
        raise CheckpointError(f"no checkpoint in {path}: expected {path / CHECKPOINTS}/step-*/{MANIFEST}")
    try:
        verify_checkpoint(ckpts[-1])
    except CheckpointError as e:
        for older in reversed(ckpts[:-1]):
            try:
                verify_checkpoint(older)
            except CheckpointError:
                continue
            raise CheckpointError(f"{e}; the previous checkpoint {older} is intact: {use.format(older)}") from e
        raise CheckpointError(f"{e}; no intact checkpoint remains in {path / CHECKPOINTS}") from e
    return ckpts[-1]


def remove_stale_temporaries(run_dir: str | Path) -> int:
    """Delete the temporary folders that interrupted checkpoint writes left in ``run_dir`` (each may hold a
    whole checkpoint). Call it when a run starts, before any checkpoint is written. Returns the bytes freed."""
    root = Path(run_dir) / CHECKPOINTS
    stale = [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")] if root.is_dir() else []
    freed = sum(f.stat().st_size for d in stale for f in d.rglob("*") if f.is_file())
    for folder in stale:
        shutil.rmtree(folder)
    if stale:
        logger.info("removed %d unfinished checkpoint folder(s) from %s (%d bytes)", len(stale), root, freed)
    return freed


def save_weights(model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's weights as ``model.safetensors`` (``save_pretrained`` when the model has it, for HF).

    Args:
        model: the model.
        directory: the folder to write into.
        state_dict: the weights to write instead of ``model.state_dict()`` (e.g. gathered from FSDP shards).
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):  # its own files (config, tied weights); the vision models' are plain
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar inside our own
        try:
            model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    elif state_dict is not None:
        from safetensors.torch import save_file

        save_file(state_dict, str(directory / WEIGHTS), metadata={"format": "pt"})
    else:
        from safetensors.torch import save_model

        save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load ``model.safetensors`` into ``model`` in place; tied parameters may be stored once."""
    state = load_file(str(directory / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if not (k in params and params[k].data_ptr() in loaded)]
    if untied or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS} does not match the model: missing {untied[:5]}, unexpected {unexpected[:5]}"
        )


def load_trainer_state(directory: Path) -> dict[str, Any]:
    """Read ``trainer_state.pt`` (optimizer, scheduler, RNG, data position, step).

    Raises:
        CheckpointError: the file holds objects that ``torch.load(weights_only=True)`` refuses to unpickle.
    """
    path = directory / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0]).split(" was not")[0]
        raise CheckpointError(
            f"{path} holds objects that are not tensors or plain containers, which are refused for safety "
            f"({reason}); this trainer never writes them: resume from a checkpoint this version of retentive "
            "wrote, or start afresh (--overwrite, or another --out)"
        ) from e


# What a resumed run may change, and why it stays the same run: these fields alter neither the model nor the steps
# already taken. Every other field of run.json (the model, the tokenizer, the data, the sequence length, the batch,
# the optimizer's settings, the seed) is refused on resume: the checkpoint could not continue the run it describes.
RESUMABLE_CHANGES: dict[str, str] = {
    "steps": "a run may grow (the schedule's remaining steps stretch)",
    "epochs": "train-vision's steps, counted in passes over the data",
    "eval_interval": "evaluation measures the model and trains nothing",
    "eval_batches": "evaluation only (how many validation batches)",
    "eval_batch_size": "evaluation only (train-vision's test batches)",
    "log_interval": "what metrics.jsonl records, not what is trained",
    "ckpt_interval": "when checkpoints are written, not what is trained",
    "keep_last": "how many checkpoints are kept",
    "progress": "the progress bar",
    "device": "where the same steps run (a GPU run may continue on another GPU, or on the CPU)",
    "precision": "the arithmetic of the same steps (auto follows the device)",
    "compile": "torch.compile runs the same model",
    "activation_checkpointing": "the backward recomputes the same activations instead of keeping them",
    "parallel": "checkpoints have the same format under DDP, FSDP and alone",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The configuration stored in ``run_dir``'s ``run.json``; None when the directory holds no run."""
    run_file = Path(run_dir) / RUN_FILE
    return json.loads(run_file.read_text()) if run_file.is_file() else None


def check_run_dir(run_dir: str | Path, run_config: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Refuse a run that ``run_dir`` may not hold, writing nothing.

    It reads files only, so every process of a ``torchrun`` group can call it before the group forms: all of them
    then refuse alike, with the same message.

    Args:
        run_dir: the output directory.
        run_config: a JSON-serializable description of the run (model, data, tokenizer, training options), as
            sections of fields (``{"lm": {...}, "train": {...}}``).
        resume: continue the run already there (its configuration must match, apart from RESUMABLE_CHANGES).
        overwrite: the directory's run will be replaced.

    Raises:
        FileExistsError: the directory holds a run and neither ``resume`` nor ``overwrite`` was given, or
            ``resume`` was given for a run with a different configuration, or it holds files but no run.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a run directory: choose another --out")
    old = read_run_config(run_dir)
    if old is None:
        if run_dir.exists() and any(run_dir.iterdir()) and not resume:
            # never delete a folder that is not a run directory, even with --overwrite
            raise FileExistsError(
                f"{run_dir} is not empty and has no {RUN_FILE} (not a run directory): use another --out"
            )
        return
    if overwrite:
        return
    a, b = _flatten(old), _flatten(json.loads(json.dumps(run_config)))  # compared as stored (tuples -> lists)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if not resume:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        what = f"a different run ({shown})" if diff else "this run already"
        raise FileExistsError(
            f"{run_dir} holds {what}: pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out directory"
        )
    blocking = [k for k in diff if k.split(".", 1)[-1] not in RESUMABLE_CHANGES]  # "train.steps" -> "steps"
    if blocking:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in blocking[:6])
        raise FileExistsError(
            f"cannot resume: {run_dir} holds a run with a different configuration ({shown}), which a resumed run "
            "cannot change; use --overwrite to replace it or another --out directory"
        )


def prepare_run_dir(run_dir: str | Path, run_config: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Make sure ``run_dir`` may hold this run (:func:`check_run_dir`), and record its configuration in ``run.json``
    (with ``overwrite``, after deleting the run it held).

    Raises:
        FileExistsError: as :func:`check_run_dir`.
    """
    check_run_dir(run_dir, run_config, resume, overwrite)
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if overwrite and run_file.is_file():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(run_config, indent=2) + "\n")
    os.replace(tmp, run_file)
