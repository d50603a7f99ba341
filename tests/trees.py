"""Tree: a batch of draft trees in the tree contract (docs/design.md), and converters into it.
A test helper: the library itself builds trees from its drafters' tries (decoding.pack_tries).

Per sequence, T nodes in topological order: parents[b, 0] == -1, parents[b, i] < i. Node 0 is
the root (the last emitted token, its KV not yet cached); tokens[b, i] == -1 marks a padding
node, which is never accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from treedec import ops


class Tree:
    """parents int32 [B, T] and tokens int64 [B, T], with derived depth and packed ancestor mask."""

    def __init__(self, parents: torch.Tensor, tokens: torch.Tensor):
        if not isinstance(parents, torch.Tensor) or not isinstance(tokens, torch.Tensor):
            raise TypeError("parents and tokens must be torch.Tensors")
        if parents.dim() != 2:
            raise ValueError(f"parents has shape {tuple(parents.shape)}; expected [B, T]")
        if tokens.shape != parents.shape:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}; expected {tuple(parents.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens has dtype {tokens.dtype}; expected an integer dtype")
        self.parents = parents.to(torch.int32).contiguous()  # [B, T]
        self.tokens = tokens.to(torch.int64).contiguous()  # [B, T], -1 = padding node
        bad = (self.tokens < -1).nonzero()
        if bad.numel():
            b, i = (int(x) for x in bad[0])
            raise ValueError(f"tokens[{b}, {i}] = {int(self.tokens[b, i])} must be >= 0, or -1 for padding")
        self.depth, self.tree_mask = ops.build_tree(self.parents)  # validates the tree contract

    @property
    def batch_size(self) -> int:
        return self.parents.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[1]

    def positions(self, prefix_len: torch.Tensor) -> torch.Tensor:
        """Position ids int64 [B, T]: prefix_len[b] + depth[b, i] (prefix_len without left padding)."""
        return prefix_len.to(torch.int64).view(-1, 1) + self.depth.to(torch.int64)

    def paths(self) -> list[list[list[int]]]:
        """Per sequence, per node, the node indices from the root down to that node."""
        out = []
        for row in self.parents.tolist():
            paths: list[list[int]] = []
            for i, parent in enumerate(row):
                paths.append([i] if parent < 0 else paths[parent] + [i])
            out.append(paths)
        return out

    @classmethod
    def from_parents(cls, parents: Sequence[int], tokens: Sequence[int], batch_size: int = 1) -> Tree:
        """One parent list and token list, repeated for `batch_size` sequences."""
        p = torch.tensor([list(parents)] * batch_size, dtype=torch.int32)
        t = torch.tensor([list(tokens)] * batch_size, dtype=torch.int64)
        return cls(p, t)

    def __repr__(self) -> str:
        return f"Tree(batch_size={self.batch_size}, num_nodes={self.num_nodes})"


def parents_from_choices(choices: Sequence[Sequence[int]]) -> tuple[list[int], list[tuple[int, ...]]]:
    """Medusa-style choice lists -> (parents with the root at index 0, the choice path of each node).

    `[[0], [0, 0], [1]]` means: the root's top-1 child, that child's top-1 child, the root's
    top-2 child. Nodes are ordered by depth, then by choice, so parents come first. Every
    prefix of a choice must itself be a choice.
    """
    paths = sorted({tuple(int(c) for c in choice) for choice in choices}, key=lambda p: (len(p), p))
    for path in paths:
        if not path:
            raise ValueError("a choice must be non-empty (the root is implicit)")
        if any(c < 0 for c in path):
            raise ValueError(f"choice {list(path)} has a negative rank")
    index = {(): 0}
    parents = [-1]
    for path in paths:
        if path[:-1] not in index:
            raise ValueError(f"choice {list(path)} has no parent choice {list(path[:-1])}")
        index[path] = len(parents)
        parents.append(index[path[:-1]])
    return parents, [()] + paths


def chain_parents(num_nodes: int) -> list[int]:
    """A chain: node i's parent is i - 1."""
    return [i - 1 for i in range(num_nodes)]
