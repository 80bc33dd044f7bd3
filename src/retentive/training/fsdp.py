"""FSDP2 (``fully_shard``) for the trainer: shard per block, and gather full state dicts for the usual checkpoints.

Every module whose class is named in the model's ``_no_split_modules`` (e.g. ``RetNetBlock``) becomes one FSDP unit,
then the whole model (embeddings, head, norms) the root unit. Checkpoints keep the format of an unsharded run: the
full weights (``model.safetensors``) and the optimizer state keyed by parameter index, as ``optimizer.state_dict()``
gives it, so a checkpoint written under FSDP resumes under DDP or alone, and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .distributed import DistInfo

# full (unsharded) tensors, gathered on CPU on process 0 only (the other processes get empty dicts)
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` over all processes: each block, then the whole model.

    Args:
        model: on ``info.device``; its blocks are the submodules whose class name is in ``model._no_split_modules``.
        info: the process group info (``world_size`` > 1).

    Returns:
        ``model`` (its parameters are now sharded DTensors): build the optimizer after this.
    """
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full model and optimizer state dicts of a sharded model (every process must call it).

    Returns:
        ``(model_state, optimizer_state)`` on CPU on process 0, in the format of ``model.state_dict()`` and
        ``optimizer.state_dict()`` (state keyed by parameter index); empty dicts on the other processes.
    """
    model_state = get_model_state_dict(model, options=_GATHER)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    model_state = {k: v for k, v in model_state.items() if k not in tied}  # a tied parameter is stored once
    by_name = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not by_name:
        return model_state, {}
    index = {name: i for i, name in enumerate(name for g in by_name["param_groups"] for name in g["params"])}
    optimizer_state = {
        "state": {index[name]: s for name, s in by_name["state"].items()},
        "param_groups": [g | {"params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]],
    }
    return model_state, optimizer_state


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full ``optimizer.state_dict()`` (keyed by parameter index, on every process) into a sharded model's
    optimizer; each process keeps its shard."""
    names = {param: name for name, param in model.named_parameters()}
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    by_name = {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [g | {"params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
