"""treedec.ops: one validated entry point per kernel.

Each function checks its arguments once (dtype, device, shape, value ranges where cheap),
picks a backend for the device (see `_backend`), and calls it. Callers never import a
backend directly, so native kernels slot in here without changing them.
"""

from ._backend import available_backends, choose_backend, requested_backend
from .attention import tree_attention
from .compact import compact_kv
from .heads import draft_heads_topk
from .linear import linear_rows, loop_linear_rows
from .lm_head import lm_head_backend, lm_head_topk
from .rows import gather_rows, scatter_rows
from .sample import sample_tokens
from .tree import build_tree
from .verify import verify_greedy, verify_sample

__all__ = [
    "available_backends",
    "build_tree",
    "choose_backend",
    "compact_kv",
    "draft_heads_topk",
    "gather_rows",
    "linear_rows",
    "lm_head_backend",
    "lm_head_topk",
    "loop_linear_rows",
    "requested_backend",
    "sample_tokens",
    "scatter_rows",
    "tree_attention",
    "verify_greedy",
    "verify_sample",
]
