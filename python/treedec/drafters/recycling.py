"""Token Recycling: reuse the model's own top-k guesses from earlier steps.

An adjacency table holds, for each token id, the top-k tokens the model ranked after it the
last time that token was verified. Every verified node refreshes its row. A static template
of rank paths (children of the root by rank, their children by rank, ...) is expanded through
the table breadth-first into a candidate tree. The table lives on the patched model's state,
so it persists across `generate` calls.
"""

from __future__ import annotations

import heapq

import numpy as np

from .base import Drafter, DraftTrie, StepOutcome

MAX_KEY_DEPTH = 8


def rank_template(num_nodes: int, width: int, max_depth: int) -> list[tuple[int, ...]]:
    """The `num_nodes` rank paths with the highest prior, parents before children.

    Prior of a path = product over its ranks of 1 / (rank + 1.6)^2 * 0.7^depth-ish; what matters is
    the order: wide at depth 1, narrowing with depth, the top-1 chain deepest. Real acceptance
    rates come from the loop's measurements, not from this prior.
    """

    def prior(rank: int) -> float:
        return 0.75 / (1.0 + rank) ** 1.5

    paths: list[tuple[int, ...]] = []
    heap = [(-prior(r), (r,)) for r in range(width)]
    heapq.heapify(heap)
    while heap and len(paths) < num_nodes:
        neg_score, path = heapq.heappop(heap)
        paths.append(path)
        if len(path) < max_depth:
            for r in range(width):
                heapq.heappush(heap, (neg_score * prior(r), path + (r,)))
    return paths


class RecyclingTable:
    """int32 [V, k] successor table, -1 where a token has not been verified yet."""

    def __init__(self, vocab_size: int, width: int):
        self.successors = np.full((vocab_size, width), -1, dtype=np.int32)

    @property
    def width(self) -> int:
        return self.successors.shape[1]

    def update(self, tokens: np.ndarray, topk: np.ndarray) -> None:
        """tokens int [N], topk int [N, >=width]; rows of padding tokens (-1) are skipped."""
        valid = tokens >= 0
        self.successors[tokens[valid]] = topk[valid, : self.width]


class RecyclingDrafter(Drafter):
    name = "recycling"

    def __init__(self, table: RecyclingTable, template_nodes: int = 40, max_depth: int = 6):
        self.table = table
        self.topk = table.width
        self.template = rank_template(template_nodes, table.width, max_depth)

    def propose(self, seq: int, root_token: int) -> DraftTrie:
        trie = DraftTrie(root_token)
        self.expand(trie)
        return trie

    def expand(self, trie: DraftTrie) -> None:
        """Grow the template under the trie's root; nodes already there keep their keys."""
        successors = self.table.successors
        node_of = {(): 0}
        for path in self.template:
            parent = node_of.get(path[:-1])
            if parent is None:
                continue
            token = int(successors[trie.tokens[parent], path[-1]])
            if token < 0:
                continue
            node_of[path] = trie.child(parent, token, ("recycling", min(len(path), MAX_KEY_DEPTH), path[-1]))

    def observe(self, outcome: StepOutcome) -> None:
        tokens = outcome.tokens.reshape(-1).numpy()
        self.table.update(tokens, outcome.topk.reshape(tokens.shape[0], -1).numpy())
