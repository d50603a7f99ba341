import torch

from .. import reference
from . import _cpp, _cuda
from ._checks import check_parents, check_tensor
from .registry import Op


def _fake(parents):
    batch, num_nodes = parents.shape
    words = (num_nodes + 31) // 32
    return parents.new_empty(batch, num_nodes, dtype=torch.int32), parents.new_empty(batch, num_nodes, words,
                                                                                      dtype=torch.int32)


BUILD_TREE = Op("build_tree", "(Tensor parents, str backend) -> (Tensor, Tensor)", reference.build_tree, _fake,
                cpp=_cpp.build_tree, cuda=_cuda.build_tree)


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
    return BUILD_TREE(parents)
