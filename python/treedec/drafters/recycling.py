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

from ..options import int_option
from .base import DrafterEnv, DrafterSpec, DraftTrie, RowDrafter, StepOutcome

MAX_KEY_DEPTH = 8
OPTIONS = ("recycling_width", "template_nodes", "max_depth")
EDGE_MARGIN = 0.05  # a uniform this close to its slice's edge makes a "coupled-edge" guess
# Candidates expanded per node the step may verify: the sizer keeps the best by measured path
# probability, so a pool larger than the tree lets it pick the shape (at a fixed 64-node tree,
# 160 candidates gave tau 1.95 where 40 gave 1.74: bench/results/recycling_tau), while a batch
# whose trees are small does not pay Python for candidates no tree could hold.
POOL_PER_NODE = 3


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


def uniform_at(uniforms: list[float] | None, depth: int) -> float | None:
    """The uniform that picks the child of a node at `depth` (None: greedy, or past the list)."""
    return uniforms[depth] if uniforms is not None and depth < len(uniforms) else None


class RecyclingTable:
    """Successor table: int32 [V, k] ids (-1 where a token has not been verified yet) and their
    sampling probabilities float32 [V, k] (NaN where the last update was greedy)."""

    def __init__(self, vocab_size: int, width: int):
        self.successors = np.full((vocab_size, width), -1, dtype=np.int32)
        self.probs = np.full((vocab_size, width), np.nan, dtype=np.float32)

    @property
    def width(self) -> int:
        return self.successors.shape[1]

    def update(self, tokens: np.ndarray, topk: np.ndarray, probs: np.ndarray | None = None) -> None:
        """tokens int [N], topk int [N, >=width], probs float [N, >=width] or None (greedy);
        rows of padding tokens (-1) are skipped."""
        valid = tokens >= 0
        self.successors[tokens[valid]] = topk[valid, : self.width]
        self.probs[tokens[valid]] = np.nan if probs is None else probs[valid, : self.width]

    def slot_order(self, token: int, uniform: float | None) -> tuple[list[int], str | None]:
        """Ranks of `token`'s successors in the order the drafter tries them, and how they were
        ordered: "coupled" (the successor `uniform` would pick under the remembered probabilities
        first, then the one across the nearer edge of its slice; "coupled-edge" when `uniform`
        is within EDGE_MARGIN of that edge), "tail" (`uniform` falls past the remembered
        successors' mass: none of them is likely) or None (greedy, or no probabilities
        remembered: plain rank order)."""
        ranks = list(range(self.width))
        if uniform is None:
            return ranks, None
        probs = self.probs[token]
        if np.isnan(probs[0]):
            return ranks, None
        upper = np.cumsum(probs)
        picked = int(np.searchsorted(upper, uniform, side="right"))
        if picked >= self.width:
            return ranks, "tail"
        # If the distribution moved since, u most likely lands in the slice across the nearer
        # edge: that successor goes second. Near an edge the guess is shakier: its own label.
        lower = upper[picked - 1] if picked > 0 else 0.0
        below = uniform - lower < upper[picked] - uniform
        neighbour = picked - 1 if below and picked > 0 else picked + 1
        order = [picked] + ([neighbour] if neighbour < self.width else [])
        order += [r for r in ranks if r not in order]
        edge = min(uniform - lower, upper[picked] - uniform) < EDGE_MARGIN
        return order, "coupled-edge" if edge else "coupled"


class RecyclingDrafter(RowDrafter):
    """Drafts from the table alone, so it keeps no histories."""

    name = "recycling"

    def __init__(self, table: RecyclingTable, template_nodes: int = 160, max_depth: int = 6):
        self.table = table
        self.topk = table.width
        self.template = rank_template(template_nodes, table.width, max_depth)
        self.pool = len(self.template)  # template paths expanded this step (`bound`)

    def start(self, prompts, hidden=None) -> None:
        pass

    def bound(self, max_nodes: int | None) -> None:
        """Expand at most POOL_PER_NODE candidates per node of the largest tree the step may
        verify (DraftRequest.max_nodes; None: the whole template)."""
        self.pool = len(self.template) if max_nodes is None else min(len(self.template), POOL_PER_NODE * max_nodes)

    def propose(self, request):
        self.bound(request.max_nodes)
        return super().propose(request)

    def propose_row(self, seq: int, root_token: int, uniforms: list[float] | None = None) -> DraftTrie:
        trie = DraftTrie(root_token)
        self.expand(trie, uniforms)
        return trie

    def expand(self, trie: DraftTrie, uniforms: list[float] | None = None) -> None:
        """Grow the template under the trie's root; nodes already there keep their keys.
        A template path's last entry is a slot; `slot_order` maps it to a rank of the parent's
        successors (the identity when greedy). The key names depth, slot and ordering."""
        successors = self.table.successors
        node_of = {(): 0}
        orders: dict[int, tuple[list[int], str | None]] = {}  # parent node -> its slot order
        for path in self.template[: self.pool]:
            parent = node_of.get(path[:-1])
            if parent is None:
                continue
            parent_token = trie.tokens[parent]
            if parent not in orders:  # len(path) - 1 is the parent's depth
                orders[parent] = self.table.slot_order(parent_token, uniform_at(uniforms, len(path) - 1))
            ranks, how = orders[parent]
            token = int(successors[parent_token, ranks[path[-1]]])
            if token < 0:
                continue
            key = ("recycling", min(len(path), MAX_KEY_DEPTH), path[-1], how)
            node_of[path] = trie.child(parent, token, key)

    def label_coupling(self, trie: DraftTrie, uniforms: list[float] | None) -> None:
        """Append to each node's key whether the table's coupled guess at its position agrees
        with it ("agree" / "disagree"), finds no likely guess ("tail") or cannot tell (None), so
        the loop learns separate acceptance rates for drafts from elsewhere (auto's lookup).
        Greedy calls (no uniforms) leave the keys as they are."""
        if uniforms is None:
            return
        depth = [0] * len(trie)
        for i in range(1, len(trie)):
            parent = trie.parents[i]
            depth[i] = depth[parent] + 1
            ranks, how = self.table.slot_order(trie.tokens[parent], uniform_at(uniforms, depth[parent]))
            if how in ("coupled", "coupled-edge"):
                guess = int(self.table.successors[trie.tokens[parent], ranks[0]])
                how = "agree" if guess == trie.tokens[i] else "disagree"
            trie.keys[i] = (*trie.keys[i], how)

    def observe(self, outcome: StepOutcome) -> None:
        """Every verified node's row, rejected ones too, as the paper does; where a token sits at
        several nodes the last one's top-k stays. (Keeping its accepted node's instead changed
        tau by -0.01 at a fixed 64-node tree: bench/results/recycling_tau.)"""
        tokens = outcome.tokens.reshape(-1).numpy()
        probs = None if outcome.topk_probs is None else outcome.topk_probs.reshape(tokens.shape[0], -1).numpy()
        self.table.update(tokens, outcome.topk.reshape(tokens.shape[0], -1).numpy(), probs)


def build(options: dict, env: DrafterEnv) -> RecyclingDrafter:
    """The table lives in the model's tables (one per width), so it outlives the call."""
    width = int_option("recycling_width", options.get("recycling_width", 8))
    table = env.tables.get(("recycling", width))
    if table is None:
        table = env.tables[("recycling", width)] = RecyclingTable(env.vocab_size, width)
    return RecyclingDrafter(table, int_option("template_nodes", options.get("template_nodes", 160)),
                            int_option("max_depth", options.get("max_depth", 6)))


SPEC = DrafterSpec("recycling", OPTIONS, build)
