"""Argument checks shared by the ops: one place for the wording of every error.

Type, dtype and shape checks read only metadata and always run. Checks of tensor *values* (tree
structure, row ranges) read device memory back to the host, which a CUDA stream under graph
capture forbids; they are skipped while the current stream captures. Run a step eagerly first (as
every capture's warm-up does) to validate its inputs.
"""

import torch


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_tensor(name: str, x, dtypes: tuple[torch.dtype, ...], ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {str(x.dtype).removeprefix('torch.')}; expected {allowed}")
    if x.dim() != ndim:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {ndim} dimensions")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")


def check_projection(name: str, x: torch.Tensor, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """x [N, H] against a projection weight [O, H]: same dtype (one of `dtypes`), device and width."""
    check_tensor(name, x, dtypes, 2)
    check_tensor("weight", weight, dtypes, 2)
    check_same_device(**{name: x, "weight": weight})
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name} has width {x.shape[1]}; weight has {weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise ValueError(f"{name} is {x.dtype} but weight is {weight.dtype}")


def check_shape(name: str, x: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(expected)}")


def check_parents(parents: torch.Tensor) -> None:
    """The tree contract: parents[b, 0] == -1 and 0 <= parents[b, i] < i for i > 0."""
    batch, num_nodes = parents.shape
    if num_nodes == 0:
        raise ValueError("parents has 0 nodes; a tree holds at least its root")
    if capturing():
        return
    root = parents[:, 0]
    bad = (root != -1).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        raise ValueError(f"parents[{b}, 0] = {int(root[b])} must be -1 (node 0 is the root)")
    if num_nodes == 1:
        return
    rest = parents[:, 1:].long()
    index = torch.arange(1, num_nodes, device=parents.device)
    bad = ((rest >= index) | (rest < 0)).nonzero()
    if bad.numel():
        b, i = int(bad[0, 0]), int(bad[0, 1]) + 1
        value = int(parents[b, i])
        if value < 0:
            raise ValueError(f"parents[{b}, {i}] = {value} must be >= 0 (only the root has no parent)")
        raise ValueError(f"parents[{b}, {i}] = {value} must be < {i} (nodes are in topological order)")
