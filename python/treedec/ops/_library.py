"""treedec's ops as torch.library custom ops (namespace "treedec"), so torch.compile and CUDA graph
capture see each one as a single opaque call.

Each custom op takes the backend name chosen by the public wrapper (which validated the
arguments), runs it, and has a fake implementation that only produces output metadata. The
public functions in `treedec.ops` call these ops while torch.compile traces them and the
backend directly in eager mode (same code, without the dispatcher's per-call overhead).
"""

from __future__ import annotations

import torch

from .. import reference
from . import _cpp, _cuda, _triton

_IMPLEMENTATIONS = {
    "build_tree": {"reference": reference.build_tree, "cpp": _cpp.build_tree, "cuda": _cuda.build_tree},
    "verify_greedy": {"reference": reference.verify_greedy, "cpp": _cpp.verify_greedy, "cuda": _cuda.verify_greedy},
    "sample_tokens": {
        "reference": reference.sample_tokens, "cpp": _cpp.sample_tokens, "cuda": _cuda.sample_tokens
    },
    "compact_kv": {"reference": reference.compact_kv, "cpp": _cpp.compact_kv, "cuda": _cuda.compact_kv},
    "tree_attention": {"reference": reference.tree_attention, "triton": _triton.tree_attention},
    "lm_head_topk": {"reference": reference.lm_head_topk, "cpp": _cpp.lm_head_topk, "triton": _triton.lm_head_topk},
    "linear_rows": {"reference": reference.linear_rows, "cpp": _cpp.linear_rows},
    "draft_heads_topk": {
        "reference": reference.draft_heads_topk, "cpp": _cpp.draft_heads_topk, "triton": _triton.draft_heads_topk
    },
    "gather_rows": {"reference": reference.gather_rows, "cpp": _cpp.gather_rows, "triton": _triton.gather_rows},
    "scatter_rows": {"reference": reference.scatter_rows, "cpp": _cpp.scatter_rows, "triton": _triton.scatter_rows},
}


def implementation(op: str, backend: str):
    """The function that runs `op` on `backend` (the reference when the backend has none)."""
    table = _IMPLEMENTATIONS[op]
    return table.get(backend, table["reference"])


# -- build_tree ---------------------------------------------------------------------------------


@torch.library.custom_op("treedec::build_tree", mutates_args=())
def build_tree_op(parents: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("build_tree", backend)(parents)


@build_tree_op.register_fake
def _(parents, backend):
    batch, num_nodes = parents.shape
    return (
        parents.new_empty(batch, num_nodes, dtype=torch.int32),
        parents.new_empty(batch, num_nodes, (num_nodes + 31) // 32, dtype=torch.int32),
    )


# -- verify_greedy ------------------------------------------------------------------------------


@torch.library.custom_op("treedec::verify_greedy", mutates_args=())
def verify_greedy_op(
    parents: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return implementation("verify_greedy", backend)(parents, tokens, target)


@verify_greedy_op.register_fake
def _(parents, tokens, target, backend):
    batch, num_nodes = parents.shape
    return (
        parents.new_empty(batch, dtype=torch.int32),
        parents.new_empty(batch, num_nodes, dtype=torch.int32),
        parents.new_empty(batch, dtype=torch.int64),
    )


# -- sample_tokens ------------------------------------------------------------------------------


@torch.library.custom_op("treedec::sample_tokens", mutates_args=())
def sample_tokens_op(probs: torch.Tensor, uniforms: torch.Tensor, backend: str) -> torch.Tensor:
    return implementation("sample_tokens", backend)(probs, uniforms)


@sample_tokens_op.register_fake
def _(probs, uniforms, backend):
    return probs.new_empty(probs.shape[0], dtype=torch.int64)


# -- compact_kv ---------------------------------------------------------------------------------


@torch.library.custom_op("treedec::compact_kv", mutates_args=("caches",))
def compact_kv_op(caches: list[torch.Tensor], prefix_len: torch.Tensor, accept_nodes: torch.Tensor, backend: str) -> None:
    implementation("compact_kv", backend)(list(caches), prefix_len, accept_nodes)


@compact_kv_op.register_fake
def _(caches, prefix_len, accept_nodes, backend):
    return None


# -- tree_attention -----------------------------------------------------------------------------


@torch.library.custom_op("treedec::tree_attention", mutates_args=())
def tree_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    kv_start: torch.Tensor | None,
    scale: float | None,
    backend: str,
) -> torch.Tensor:
    return implementation("tree_attention", backend)(q, k, v, prefix_len, tree_mask, kv_start, scale)


@tree_attention_op.register_fake
def _(q, k, v, prefix_len, tree_mask, kv_start, scale, backend):
    return torch.empty_like(q)


# -- lm_head_topk -------------------------------------------------------------------------------


@torch.library.custom_op("treedec::lm_head_topk", mutates_args=())
def lm_head_topk_op(hidden: torch.Tensor, weight: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("lm_head_topk", backend)(hidden, weight, k)


@lm_head_topk_op.register_fake
def _(hidden, weight, k, backend):
    rows = hidden.shape[0]
    return hidden.new_empty(rows, k, dtype=torch.float32), hidden.new_empty(rows, k, dtype=torch.int64)


# -- linear_rows --------------------------------------------------------------------------------


@torch.library.custom_op("treedec::linear_rows", mutates_args=())
def linear_rows_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    return implementation("linear_rows", backend)(x, weight, bias)


@linear_rows_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


# -- draft_heads_topk ---------------------------------------------------------------------------


@torch.library.custom_op("treedec::draft_heads_topk", mutates_args=())
def draft_heads_topk_op(
    hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, lm_weight: torch.Tensor, k: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return implementation("draft_heads_topk", backend)(hidden, weights, biases, lm_weight, k)


@draft_heads_topk_op.register_fake
def _(hidden, weights, biases, lm_weight, k, backend):
    rows, heads, width = hidden.shape[0], weights.shape[0], hidden.shape[1]
    return (
        hidden.new_empty(rows, heads, k, dtype=torch.float32),
        hidden.new_empty(rows, heads, k, dtype=torch.int64),
        hidden.new_empty(rows, heads, width),
    )


# -- gather_rows / scatter_rows (layer-skip batching) -----------------------------------------------


@torch.library.custom_op("treedec::gather_rows", mutates_args=())
def gather_rows_op(x: torch.Tensor, index: torch.Tensor, backend: str) -> torch.Tensor:
    return implementation("gather_rows", backend)(x, index)


@gather_rows_op.register_fake
def _(x, index, backend):
    return x.new_empty((index.shape[0], *x.shape[1:]))


@torch.library.custom_op("treedec::scatter_rows", mutates_args=("x",))
def scatter_rows_op(x: torch.Tensor, index: torch.Tensor, block: torch.Tensor, backend: str) -> None:
    implementation("scatter_rows", backend)(x, index, block)


@scatter_rows_op.register_fake
def _(x, index, block, backend):
    return None


def compiling() -> bool:
    """True while torch.compile (dynamo) traces the caller."""
    return torch.compiler.is_compiling()
