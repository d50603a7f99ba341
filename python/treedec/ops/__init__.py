"""treedec.ops: one validated entry point per kernel.

Each function checks its arguments once (dtype, device, shape, value ranges where cheap) and runs
its op, declared once in its module (`registry.Op`: name, schema, reference, native
implementations, fake); the registry decides the backend (`registry`). Callers never import a
backend directly, so native kernels slot in here without changing them.
"""

from __future__ import annotations

import torch

from . import registry
from .attention import tree_attention
from .compact import compact_kv
from .heads import draft_heads_topk
from .linear import linear_rows, loop_linear_rows
from .lm_head import lm_head_topk
from .registry import OPS, available_backends, fallbacks, requested_backend, reset_fallbacks
from .rows import gather_rows, scatter_rows
from .sample import raise_faults, sample_tokens, sample_tokens_deferred
from .tree import build_tree
from .verify import verify_greedy, verify_sample


def choose_backend(device: torch.device, op: str | None = None) -> str:
    """The backend that runs `op` on tensors of `device` before its argument rules (without `op`,
    the device's first native backend), honouring TREEDEC_BACKEND."""
    return registry.device_backend(device) if op is None else OPS[op].backend(device)


__all__ = [
    "OPS",
    "available_backends",
    "build_tree",
    "choose_backend",
    "compact_kv",
    "draft_heads_topk",
    "fallbacks",
    "gather_rows",
    "linear_rows",
    "lm_head_topk",
    "loop_linear_rows",
    "registry",
    "requested_backend",
    "reset_fallbacks",
    "raise_faults",
    "sample_tokens",
    "sample_tokens_deferred",
    "scatter_rows",
    "tree_attention",
    "verify_greedy",
    "verify_sample",
]
