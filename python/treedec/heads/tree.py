"""The static draft tree for a set of heads, from their measured per-rank accuracies.

acc[k][r] is the chance that head k's rank-r guess is the model's token (over the training
positions). Treating heads as independent, a node whose path takes ranks (r_1, ..., r_d) is
accepted with probability prod_k acc[k][r_k], and the expected number of accepted tokens of a tree
is the sum of its nodes' probabilities (the accepted nodes form one path). A child is never more
likely than its parent, so taking the most likely open node T times (Medusa's pruning) gives the
T-node tree with the largest expected accepted length.
"""

from __future__ import annotations

import heapq


def best_tree(accuracies: list[list[float]], num_nodes: int) -> list[tuple[int, ...]]:
    """The `num_nodes` rank paths (root excluded) with the largest expected accepted length, in
    the order taken (every path's parent comes before it)."""
    if num_nodes < 0:
        raise ValueError(f"num_nodes = {num_nodes} must be >= 0")
    if any(not 0.0 <= a <= 1.0 for head in accuracies for a in head):
        raise ValueError("accuracies must lie in [0, 1]")
    chosen: list[tuple[int, ...]] = []
    frontier: list[tuple[float, tuple[int, ...]]] = []  # (-probability, path)

    def open_children(path: tuple[int, ...], probability: float) -> None:
        depth = len(path)
        if depth < len(accuracies):
            for rank, accuracy in enumerate(accuracies[depth]):
                heapq.heappush(frontier, (-probability * accuracy, path + (rank,)))

    open_children((), 1.0)
    while frontier and len(chosen) < num_nodes:
        negative, path = heapq.heappop(frontier)
        chosen.append(path)
        open_children(path, -negative)
    return chosen


def expected_accepted(accuracies: list[list[float]], paths: list[tuple[int, ...]]) -> float:
    """Sum of the paths' acceptance probabilities: the tree's expected accepted tokens."""
    total = 0.0
    for path in paths:
        probability = 1.0
        for depth, rank in enumerate(path):
            probability *= accuracies[depth][rank]
        total += probability
    return total


def size_curve(accuracies: list[list[float]], step_seconds, sizes) -> list[tuple[int, float, float, float]]:
    """For each tree size T in `sizes` (root included, T >= 1, up to the largest tree the ranks
    allow): (T, expected tokens per step of the
    best T-node tree, `step_seconds(T)`, expected tokens per second). The T to draft is the one
    with the most tokens per second, not per step: a bigger tree accepts more but costs more."""
    rows = []
    for size in sizes:
        paths = best_tree(accuracies, size - 1)
        if len(paths) < size - 1:  # every rank of every head is in already: no larger tree exists
            break
        tokens = 1.0 + expected_accepted(accuracies, paths)
        seconds = step_seconds(size)
        rows.append((size, tokens, seconds, tokens / seconds))
    return rows
