"""Which implementation an op runs: the TREEDEC_BACKEND switch and what is available.

Backends and the ops each one implements:

- ``reference``: every op, any device (pure torch, the oracle).
- ``cpp`` (``treedec._C``): build_tree, verify_greedy, sample_tokens, compact_kv, lm_head_topk, linear_rows,
  gather_rows, scatter_rows, draft_heads_topk (composed of linear_rows and lm_head_topk) on CPU tensors.
- ``cuda`` (``treedec._cuda``): build_tree, verify_greedy, sample_tokens, compact_kv on CUDA tensors.
- ``triton`` (``triton_kernels/``): tree_attention, lm_head_topk, gather_rows, scatter_rows, draft_heads_topk (all
  heads' blocks per layer in one launch, then lm_head_topk) on CUDA tensors, and on CPU tensors under
  ``TRITON_INTERPRET=1``.

``TREEDEC_BACKEND=auto`` (the default) picks, per op and device, the first of cpp (CPU) or
cuda then triton (CUDA) that is built and implements the op, else the reference. Naming a backend
forces it wherever it implements the op and runs on the tensors' device; other ops and devices
run the reference. Naming a backend that is not built raises.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
OPS = (
    "build_tree", "verify_greedy", "sample_tokens", "compact_kv", "tree_attention", "lm_head_topk", "linear_rows",
    "gather_rows", "scatter_rows", "draft_heads_topk",
)
NATIVE_OPS = {
    "cpp": frozenset({
        "build_tree", "verify_greedy", "sample_tokens", "compact_kv", "lm_head_topk", "linear_rows", "gather_rows",
        "scatter_rows", "draft_heads_topk",
    }),
    "cuda": frozenset({"build_tree", "verify_greedy", "sample_tokens", "compact_kv"}),
    "triton": frozenset({"tree_attention", "lm_head_topk", "gather_rows", "scatter_rows", "draft_heads_topk"}),
}
_AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


def requested_backend() -> str:
    name = os.environ.get("TREEDEC_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"TREEDEC_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@functools.cache
def _built(name: str) -> bool:
    if name == "reference":
        return True
    if name == "cpp":
        from .. import _native

        return _native.cpp() is not None
    if name == "cuda":
        from .. import _native

        return _native.cuda() is not None
    if name == "triton":
        from . import _triton

        return _triton.available()
    return False


def available_backends() -> dict[str, bool]:
    """Which backends are built and importable in this install (not whether a device is present)."""
    return {name: _built(name) for name in BACKENDS if name != "auto"}


def implements(backend: str, op: str) -> bool:
    """Whether `backend` has its own kernel for `op` (the reference implements everything)."""
    if backend == "reference":
        return True
    if op not in NATIVE_OPS.get(backend, ()):
        return False
    if backend == "triton":
        from . import _triton

        return _triton.kernel(op) is not None
    return True


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether `backend`'s kernels take tensors on `device`."""
    kind = torch.device(device).type
    if backend == "cpp":
        return kind == "cpu"
    if backend == "cuda":
        return kind == "cuda"
    if backend == "triton":
        return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1")
    return backend == "reference"


def choose_backend(device: torch.device, op: str | None = None) -> str:
    """The backend that runs `op` (or, without `op`, the device's native backend) on tensors of
    `device`, honouring TREEDEC_BACKEND."""
    name = requested_backend()
    if name == "reference":
        return "reference"
    device = torch.device(device)
    if name != "auto":
        if not _built(name):
            raise RuntimeError(
                f"TREEDEC_BACKEND={name} was requested but that backend is not built in this install "
                "(`treedec info` lists what is available); unset it or use TREEDEC_BACKEND=reference"
            )
        if runs_on(name, device) and (op is None or implements(name, op)):
            return name
        return "reference"
    for candidate in _AUTO_ORDER.get(device.type, ()):
        if _built(candidate) and (op is None or implements(candidate, op)):
            return candidate
    return "reference"
