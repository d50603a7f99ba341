"""Find the Triton kernels (the repository's top-level ``triton_kernels/``) without requiring them.

They are loaded as the package ``treedec_triton``: an installed ``treedec_triton`` if there is
one, else the ``triton_kernels/`` directory next to ``python/`` in a source checkout (editable
install). The name is private on purpose: PyPI's ``triton_kernels`` is a different project.
Anything that fails (no ``triton``, no directory, an import error inside a kernel module) makes
that kernel unavailable, never an error at import time.
"""

from __future__ import annotations

import functools
import math
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

PACKAGE = "treedec_triton"
# op -> (module, host function) in triton_kernels/
KERNELS = {
    "tree_attention": ("tree_attention", "tree_attention"),
    "lm_head_topk": ("lm_head_topk", "lm_head_topk"),
    "gather_rows": ("rows", "gather_rows"),
    "scatter_rows": ("rows", "scatter_rows"),
    "draft_heads_topk": ("draft_heads", "head_states"),  # the blocks; the LM-head top-k is lm_head_topk's
}
LM_HEAD_MAX_K = 16  # the streaming top-k keeps k values per row in registers


def _checkout_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "triton_kernels"  # python/treedec/ops/ -> repo root


@functools.cache
def _package() -> types.ModuleType | None:
    try:
        import triton  # noqa: F401
    except Exception:
        return None
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    try:
        if importlib.util.find_spec(PACKAGE) is not None:
            return importlib.import_module(PACKAGE)
    except Exception:
        pass
    directory = _checkout_dir()
    if not directory.is_dir():
        return None
    init = directory / "__init__.py"
    try:
        if init.exists():
            spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(directory)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[PACKAGE] = module
            spec.loader.exec_module(module)
        else:
            module = types.ModuleType(PACKAGE)
            module.__path__ = [str(directory)]
            sys.modules[PACKAGE] = module
        return module
    except Exception:
        sys.modules.pop(PACKAGE, None)
        return None


@functools.cache
def kernel(op: str):
    """The host function for `op` from triton_kernels/, or None when it cannot be loaded."""
    if op not in KERNELS or _package() is None:
        return None
    module_name, function = KERNELS[op]
    try:
        module = importlib.import_module(f"{PACKAGE}.{module_name}")
    except Exception:
        return None
    return getattr(module, function, None)


def available() -> bool:
    """Triton imports and at least one kernel module loads."""
    return any(kernel(op) is not None for op in KERNELS)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    kv_start: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Triton tree attention (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    function = kernel("tree_attention")
    if kv_start is None:
        kv_start = torch.zeros_like(prefix_len)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return function(q, k, v, prefix_len.contiguous(), tree_mask.contiguous(), kv_start.contiguous(), scale)


def lm_head_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k above LM_HEAD_MAX_K takes the reference (logits, then torch.topk)."""
    if k > LM_HEAD_MAX_K:
        from .. import reference

        return reference.lm_head_topk(hidden, weight, k)
    values, indices = kernel("lm_head_topk")(hidden, weight, k)
    return values.float(), indices.long()


def draft_heads_topk(hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, lm_weight: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All heads' blocks (one Triton launch per block layer), then the Triton LM-head top-k over the
    [N*K, H] states: row n*K + j is head j's state for row n, as in the reference."""
    states = kernel("draft_heads_topk")(hidden, weights, biases)  # [N, K, H] contiguous
    rows, heads, width = states.shape
    values, ids = lm_head_topk(states.view(rows * heads, width), lm_weight, k)
    return values.view(rows, heads, k), ids.view(rows, heads, k), states


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows that are not contiguous in memory (a strided view) take the reference path."""
    if x.shape[0] == 0 or not x[0].is_contiguous():
        from .. import reference

        return reference.gather_rows(x, index)
    return kernel("gather_rows")(x, index)


def scatter_rows(x: torch.Tensor, index: torch.Tensor, block: torch.Tensor) -> None:
    kernel("scatter_rows")(x, index, block)
