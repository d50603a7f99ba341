"""Calls into treedec._C (C++ CPU kernels) for already validated CPU tensors.

Outputs are allocated here and every element is written by the kernel. Thread count follows
torch.get_num_threads() unless TREEDEC_CPU_THREADS is set; TREEDEC_CPU_ISA (auto, scalar, avx2,
avx512, avx512bf16) pins lm_head_topk's instruction set, for tests and benchmarks, and
TREEDEC_LMHEAD_TILE ("6x4": hidden rows x weight rows per register tile, AVX-512 paths) overrides
its tile shape and TREEDEC_LMHEAD_PREFETCH (bytes ahead, default 16384) its software prefetch
distance, for tuning experiments.
"""

from __future__ import annotations

import os

import torch

from .. import _native, reference

LM_HEAD_DTYPES = (torch.float32, torch.bfloat16)


def num_threads() -> int:
    value = os.environ.get("TREEDEC_CPU_THREADS", "")
    return max(1, int(value)) if value else torch.get_num_threads()


def _malformed(parents: torch.Tensor, flat: int) -> ValueError:
    b, i = divmod(flat, parents.shape[1])
    return ValueError(f"parents[{b}, {i}] = {int(parents[b, i])} is not a valid parent (kernel check)")


def build_tree(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    module = _native.require_cpp()
    parents = parents.contiguous()
    batch, num_nodes = parents.shape
    depth = torch.empty(batch, num_nodes, dtype=torch.int32)
    tree_mask = torch.empty(batch, num_nodes, (num_nodes + 31) // 32, dtype=torch.int32)
    bad = module.build_tree(parents.data_ptr(), depth.data_ptr(), tree_mask.data_ptr(), batch, num_nodes, 1)
    if bad >= 0:
        raise _malformed(parents, bad)
    return depth, tree_mask


def verify_greedy(
    parents: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    module = _native.require_cpp()
    parents, tokens, target = parents.contiguous(), tokens.contiguous(), target.contiguous()
    batch, num_nodes = parents.shape
    accept_len = torch.empty(batch, dtype=torch.int32)
    accept_nodes = torch.empty(batch, num_nodes, dtype=torch.int32)
    bonus = torch.empty(batch, dtype=torch.int64)
    bad = module.verify_greedy(
        parents.data_ptr(), tokens.data_ptr(), target.data_ptr(),
        accept_len.data_ptr(), accept_nodes.data_ptr(), bonus.data_ptr(), batch, num_nodes, 1,
    )  # fmt: skip
    if bad >= 0:
        raise _malformed(parents, bad)
    return accept_len, accept_nodes, bonus


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Threads over rows (unlike verify_greedy): each row is a whole [V] scan."""
    module = _native.require_cpp()
    probs, uniforms = probs.contiguous(), uniforms.contiguous()
    rows, vocab = probs.shape
    tokens = torch.empty(rows, dtype=torch.int64)
    module.sample_tokens(probs.data_ptr(), uniforms.data_ptr(), tokens.data_ptr(), rows, vocab, num_threads())
    return tokens


def compact_kv(caches: list[torch.Tensor], prefix_len: torch.Tensor, accept_nodes: torch.Tensor) -> None:
    """Every tensor's rows (last dim) are contiguous (the registry sends others to the reference):
    all layers in one call."""
    module = _native.require_cpp()
    prefix_len, accept_nodes = prefix_len.contiguous(), accept_nodes.contiguous()
    batch, num_nodes = accept_nodes.shape
    meta: list[int] = []
    for cache in caches:
        shape, stride, size = cache.shape, cache.stride(), cache.element_size()
        meta += (cache.data_ptr(), shape[1], shape[3] * size, stride[0] * size, stride[1] * size, stride[2] * size)
    module.compact_kv(
        meta, prefix_len.data_ptr(), accept_nodes.data_ptr(), batch, caches[0].shape[2], num_nodes, num_threads()
    )


def rows_not_contiguous(caches: list[torch.Tensor]) -> bool:
    """Whether some cache's rows (last dim) are strided: the kernel copies whole rows."""
    return any(c.stride(3) != 1 and c.shape[3] > 1 for c in caches)


def lm_head_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 and bf16 (LM_HEAD_DTYPES; the registry sends others to the reference)."""
    module = _native.require_cpp()
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    rows, width = hidden.shape
    values = torch.empty(rows, k, dtype=torch.float32)
    indices = torch.empty(rows, k, dtype=torch.int64)
    module.lm_head_topk(
        hidden.data_ptr(), weight.data_ptr(), values.data_ptr(), indices.data_ptr(),
        rows, weight.shape[0], width, hidden.stride(0), weight.stride(0), k,
        hidden.dtype == torch.bfloat16, os.environ.get("TREEDEC_CPU_ISA", "auto"), num_threads(),
    )  # fmt: skip
    return values, indices


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear_rows(_native.require_cpp(), os.environ.get("TREEDEC_CPU_ISA", "auto"), num_threads(), x, weight,
                        bias)


def linear_rows_runner():
    """`linear_rows` with the module, ISA and thread count looked up once, for a caller that makes
    hundreds of calls in a row (the decode loop's projections: about 200 a step, where these
    lookups cost more than 1 ms)."""
    module, isa, threads = _native.require_cpp(), os.environ.get("TREEDEC_CPU_ISA", "auto"), num_threads()
    return lambda x, weight, bias=None: _linear_rows(module, isa, threads, x, weight, bias)


def _linear_rows(module, isa: str, threads: int, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    bias32 = None if bias is None else bias.float().contiguous()
    rows, width = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype)
    module.linear_rows(
        x.data_ptr(), weight.data_ptr(), 0 if bias32 is None else bias32.data_ptr(), out.data_ptr(),
        rows, weight.shape[0], width, x.stride(0), weight.stride(0),
        x.dtype == torch.bfloat16, isa, threads,
    )  # fmt: skip
    return out


def _row_view(x: torch.Tensor) -> tuple[int, int]:
    """(row bytes, row stride in bytes) of x [B, ...] with B >= 1."""
    return x[0].numel() * x.element_size(), x.stride(0) * x.element_size()


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x's rows are contiguous in memory (the registry sends strided views to the reference)."""
    if index.numel() == 0:
        return x.new_empty((0, *x.shape[1:]))
    module = _native.require_cpp()
    index = index.contiguous()
    out = torch.empty((index.shape[0], *x.shape[1:]), dtype=x.dtype)
    row_bytes, stride = _row_view(x)
    bad = module.gather_rows(x.data_ptr(), out.data_ptr(), index.data_ptr(), index.shape[0], x.shape[0], row_bytes,
                             stride, row_bytes, num_threads())
    if bad >= 0:
        raise ValueError(f"index[{bad}] = {int(index[bad])} is outside [0, {x.shape[0]}) (kernel check)")
    return out


def scatter_rows(x: torch.Tensor, index: torch.Tensor, block: torch.Tensor) -> None:
    """x is contiguous (the public op checks it)."""
    if index.numel() == 0:
        return
    module = _native.require_cpp()
    index, block = index.contiguous(), block.contiguous()
    row_bytes, stride = _row_view(x)
    bad = module.scatter_rows(block.data_ptr(), x.data_ptr(), index.data_ptr(), index.shape[0], x.shape[0],
                              row_bytes, row_bytes, stride, num_threads())
    if bad >= 0:
        raise ValueError(f"index[{bad}] = {int(index[bad])} is outside [0, {x.shape[0]}) or repeated (kernel check)")


def draft_heads_topk(hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, lm_weight: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's loop with the C++ kernels: blocks through linear_rows, then one lm_head_topk
    pass for all heads' rows."""
    return reference.draft_heads_topk(hidden, weights, biases, lm_weight, k, linear=linear_rows, topk=lm_head_topk)
