"""Pure-torch versions of every treedec kernel.

Short and obvious on purpose: these are the oracles the native kernels are tested against,
and the backend `TREEDEC_BACKEND=reference` runs everywhere. Shapes and semantics follow
the data contracts in docs/design.md; argument checking lives in `treedec.ops`, not here.
"""

from .attention import dense_tree_mask, softcapped_attention, tree_attention
from .compact import compact_kv
from .heads import draft_heads_topk
from .linear import linear_rows
from .lm_head import lm_head_topk, topk_of_logits
from .rows import gather_rows, scatter_rows
from .tree import build_tree
from .verify import sample_tokens, verify_greedy, verify_sample

__all__ = [
    "build_tree",
    "compact_kv",
    "dense_tree_mask",
    "draft_heads_topk",
    "gather_rows",
    "linear_rows",
    "lm_head_topk",
    "sample_tokens",
    "scatter_rows",
    "softcapped_attention",
    "topk_of_logits",
    "tree_attention",
    "verify_greedy",
    "verify_sample",
]
