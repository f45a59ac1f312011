"""`trainer.strategy=fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on a 1-D device mesh of all ranks.

Each rank holds 1/N of every parameter, gradient and optimizer state (DTensors); a module's full weights
exist only while it runs forward or backward. Every module inside an `nn.ModuleList` (a model's blocks or
layers) is its own FSDP unit, so only one block is gathered at a time; the rest is one unit with the root.

Checkpoints keep the launcher's one-file format: the full (unsharded) model and optimizer states are
gathered to rank 0's CPU with torch.distributed.checkpoint.state_dict (`full_state_dict=True,
cpu_offload=True`) and written there as a DDP run writes them, so resume, digests, atomic writes and the
choice of strategy on resume stay as they are. That needs the full state to fit one host's memory; beyond
that, torch.distributed.checkpoint's sharded save (`dcp.save`) is the path, which this switch does not do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

# Save: rank 0 receives the full tensors on its CPU (the other ranks get empty dicts). Load: every rank
# read the whole checkpoint file, so each takes its own shard from its own copy (no broadcast).
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True)


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """Turn `model` (identical on every rank) into FSDP units in place; its parameters become DTensors."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full state dict on rank 0 (CPU), {} on the other ranks."""
    return get_model_state_dict(model, options=_GATHER)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, state, options=_SCATTER)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names of `optimizer`, in the order torch's Optimizer.state_dict numbers them."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: the full optimizer state on rank 0 in Optimizer.state_dict()'s own layout (parameters
    numbered, not named), so the checkpoint is the one a DDP run writes; {} on the other ranks."""
    named = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not named:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an Optimizer.state_dict()-layout state (a DDP or FSDP checkpoint's) into a sharded optimizer."""
    names = _param_names(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    named = {"state": {names[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, named, options=_SCATTER)
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        for key, value in saved.items():  # the load hands tuples (Adam's betas) back as lists
            if key != "params" and isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = value


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective), anything else as it is: e.g. a gradient norm over shards."""
    return t.full_tensor() if isinstance(t, DTensor) else t
