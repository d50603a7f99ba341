import torch

from . import _library
from ._backend import choose_backend
from ._checks import check_parents, check_tensor


def build_tree(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth and packed ancestor mask of a batch of trees.

    Parameters
    ----------
    parents : int32 [B, T]
        parents[b, 0] == -1; 0 <= parents[b, i] < i for i > 0 (topological order).

    Returns
    -------
    depth : int32 [B, T]
        Root 0.
    tree_mask : int32 [B, T, ceil(T/32)]
        Bit j (little-endian, word j // 32) of row i is set iff node j is node i or its ancestor.
    """
    check_tensor("parents", parents, (torch.int32,), 2)
    check_parents(parents)
    backend = choose_backend(parents.device, "build_tree")
    if _library.compiling():
        return torch.ops.treedec.build_tree(parents, backend)
    return _library.implementation("build_tree", backend)(parents)
