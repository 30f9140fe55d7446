"""`train.py --fsdp`: FSDP2 sharding of the GPT and whole-tensor state for checkpoints.

fully_shard turns every parameter into a DTensor sharded along dim 0 over the
torchrun world (each Block is one all-gather unit, the root holds embeddings,
final norm and head); MuonWithAdamW steps DTensor parameters itself. Checkpoints
stay whole tensors, the same as those of one process or DDP, so any run resumes any.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .config import ConfigError


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    DTensor = _dtensor_type()
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """fully_shard each transformer block, then the root, over all ranks (in place)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("--fsdp", "needs a process group: launch with torchrun (e.g. --nproc_per_node 2)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole(value):
    """A DTensor made whole (a collective), anything else unchanged."""
    return value.full_tensor() if isinstance(value, _dtensor_type()) else value


def full_model_state(model: torch.nn.Module) -> dict:
    """state_dict with whole tensors; a collective for a sharded model (call on every rank)."""
    return {key: whole(value) for key, value in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """Whole optimizer state: MuonWithAdamW gathers what its ranks own; a
    collective under torchrun (call on every rank)."""
    if hasattr(optimizer, "full_state_dict"):
        return optimizer.full_state_dict()
    state = optimizer.state_dict()
    state["state"] = {index: {key: whole(value) for key, value in sorted(entry.items())}
                      for index, entry in sorted(state["state"].items())}
    return state


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """load_state_dict of whole tensors into a model, sharded or not."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor

    current = model.state_dict()
    sharded = {}
    for key, value in state.items():
        target = current.get(key)
        if isinstance(target, _dtensor_type()):
            value = distribute_tensor(value.to(target.to_local().device), target.device_mesh, target.placements,
                                      src_data_rank=None)
        sharded[key] = value
    model.load_state_dict(sharded)


def unsharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, or for a sharded one a whole copy on every rank
    (a collective), e.g. to sample text on one rank."""
    if not is_sharded(model):
        return model
    state = full_model_state(model)
    copy = type(model)(model.config)
    copy.load_state_dict(state)
    return copy.to(next(iter(state.values())).device)
