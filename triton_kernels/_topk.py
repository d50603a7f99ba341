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
