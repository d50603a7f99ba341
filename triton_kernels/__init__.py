"""Triton kernels for treedec (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Each module holds one kernel: `_<op>_kernel` (@triton.jit) and the host function that launches
it. Argument checking lives in `treedec.ops`; these host functions only assert.

- `tree_attention.tree_attention(q, k, v, prefix_len, tree_mask, kv_start=None, scale=None)`
- `lm_head_topk.lm_head_topk(hidden, weight, k)`
- `draft_heads.head_states(hidden, weights, biases)` (draft heads' residual blocks; treedec.ops
  composes it with lm_head_topk into draft_heads_topk)

Modules are imported on demand (importing this package does not import triton).
"""

__all__ = ["draft_heads", "lm_head_topk", "tree_attention"]
