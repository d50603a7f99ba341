"""The running top-k merge the LM-head kernels share (@triton.jit helper, no launch of its own)."""

import triton
import triton.language as tl


@triton.jit
def merge_into(best_val, best_idx, key, key_idx, key_valid, K: tl.constexpr, KP: tl.constexpr):
    """Top-K over the union of a running list ([R, KP], slots >= K unused) and candidates [R, C].

    Returns the new running list, descending, ties by smallest index. Works row by row (axis 1)."""
    slot = tl.arange(0, KP)[None, :]
    cand_a = (slot < K) & (best_idx >= 0)
    cand_b = key_valid
    new_val = tl.full(best_val.shape, float("-inf"), tl.float32)
    new_idx = tl.full(best_idx.shape, 2147483647, tl.int32)
    for t in tl.static_range(K):
        top_a = tl.max(tl.where(cand_a, best_val, float("-inf")), 1)
        top_b = tl.max(tl.where(cand_b, key, float("-inf")), 1)
        top = tl.maximum(top_a, top_b)
        idx_a = tl.min(tl.where(cand_a & (best_val == top[:, None]), best_idx, 2147483647), 1)
        idx_b = tl.min(tl.where(cand_b & (key == top[:, None]), key_idx, 2147483647), 1)
        idx = tl.minimum(idx_a, idx_b)
        new_val = tl.where(slot == t, top[:, None], new_val)
        new_idx = tl.where(slot == t, idx[:, None], new_idx)
        cand_a = cand_a & (best_idx != idx[:, None])
        cand_b = cand_b & (key_idx != idx[:, None])
    return new_val, new_idx


@triton.jit
def insert_candidates(best_val, best_idx, key, key_idx, cand, K: tl.constexpr, KP: tl.constexpr):
    """Insert a tile's candidates [R, C] (where `cand`) into a running top-K [R, KP], best first.

    The running list is kept unsorted (the final merge sorts it); each insertion replaces its worst
    entry (smallest value, then largest index). Candidates come in rank order (value descending,
    then index ascending), so one that does not beat the worst entry cannot enter, and neither can
    any after it. The number of passes is the largest per-row candidate count (at most K): after
    the first tiles few logits reach a row's k-th value, so most tiles take one or two passes
    where `merge_into` always takes K."""
    slot = tl.arange(0, KP)[None, :]
    in_use = slot < K
    passes = tl.minimum(tl.max(tl.sum(cand.to(tl.int32), 1), 0), K)
    for _ in range(passes):
        top = tl.max(tl.where(cand, key, float("-inf")), 1)
        idx = tl.min(tl.where(cand & (key == top[:, None]), key_idx, 2147483647), 1)
        worst_val = tl.min(tl.where(in_use, best_val, float("inf")), 1)
        is_worst_val = in_use & (best_val == worst_val[:, None])
        worst_idx = tl.max(tl.where(is_worst_val, best_idx, -1), 1)
        # empty slots all read (-inf, 2147483647): take one of them, the highest
        worst_slot = tl.max(tl.where(is_worst_val & (best_idx == worst_idx[:, None]), slot, -1), 1)
        # a row with no candidate left has top = -inf and idx = 2147483647, which beats nothing
        better = (top > worst_val) | ((top == worst_val) & (idx < worst_idx))
        target = (slot == worst_slot[:, None]) & better[:, None]
        best_val = tl.where(target, top[:, None], best_val)
        best_idx = tl.where(target, idx[:, None], best_idx)
        cand = cand & (key_idx != idx[:, None])
    return best_val, best_idx
