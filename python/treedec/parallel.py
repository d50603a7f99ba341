"""Tensor parallelism: the ranks that share a model must decide alike.

Under transformers' tensor parallelism (`tp_plan="auto"` under torchrun) every rank runs treedec's
loop on the same tokens, and every forward is a collective: the ranks must draft the same trees
and run the same forwards, or the collectives mismatch and the run hangs or dies. Everything the
loop decides from tokens (drafts, acceptance, the drafters' tables) is the same on every rank.
Only measured times differ, and they size trees (the cost curve), route projections and bound
layer-skip's search. So each time that decides anything is agreed on first: the slowest rank's
(one all-reduce of one number), which every rank then records. On one device nothing changes.
"""

from __future__ import annotations

import torch


def sharding_group(model: torch.nn.Module):
    """The process group `model`'s parameters are sharded over (DTensor parameters on a mesh of
    more than one rank), or None for a model on one rank."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    from torch.distributed.tensor import DTensor

    for parameter in model.parameters():
        if isinstance(parameter, DTensor) and parameter.device_mesh.size() > 1:
            mesh = parameter.device_mesh
            # a 1-D mesh is the tensor-parallel group; on a larger mesh every rank agrees
            return mesh.get_group() if mesh.ndim == 1 else torch.distributed.group.WORLD
    return None


def is_distributed(tensor) -> bool:
    """Whether `tensor` is a DTensor (a sharded or replicated parameter): native kernels, which
    read raw pointers, never take one."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return tensor.to_local() if is_distributed(tensor) else tensor


class Agreement:
    """Agrees on measured seconds across the ranks of `group` (None: one rank, nothing to agree)."""

    def __init__(self, group=None, device: torch.device | None = None):
        self.group = group
        self.device = device or torch.device("cpu")

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> Agreement:
        group = sharding_group(model)
        if group is None:
            return cls()
        backend = torch.distributed.get_backend(group)
        # NCCL reduces device tensors only; gloo host tensors
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(group, device)

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else torch.distributed.get_world_size(self.group)

    def seconds(self, seconds: float) -> float:
        """The largest of every rank's `seconds`: each rank calls this at the same point."""
        if self.group is None:
            return seconds
        value = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return float(value)
