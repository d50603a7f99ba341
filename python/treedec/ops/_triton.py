"""The Triton host wrappers, and finding their kernels (the repository's top-level
``triton_kernels/``) without requiring them.

The kernels load as the package ``treedec_triton``: an installed ``treedec_triton`` if there is
one, else the ``triton_kernels/`` directory next to ``python/`` in a source checkout (editable
install). The name is private on purpose: PyPI's ``triton_kernels`` is a different project.
A kernel that fails to load (no ``triton``, no directory, an import error inside its module) is
unavailable, never an error at import time: the op registry then passes Triton over for that op,
and `load_errors()` says why (`treedec info` prints it).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import torch

PACKAGE = "treedec_triton"
LM_HEAD_MAX_K = 16  # the streaming top-k keeps k values per row in registers
_LOAD_ERRORS: dict[str, str] = {}  # "module.function" -> why it did not load


def _checkout_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "triton_kernels"  # python/treedec/ops/ -> repo root


@functools.cache
def _package() -> types.ModuleType | None:
    try:
        import triton  # noqa: F401
    except Exception as error:
        _LOAD_ERRORS["triton"] = repr(error)
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
        _LOAD_ERRORS[PACKAGE] = f"no installed {PACKAGE} and no {directory}"
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
    except Exception as error:
        sys.modules.pop(PACKAGE, None)
        _LOAD_ERRORS[PACKAGE] = repr(error)
        return None


@functools.cache
def kernel(module_name: str, function: str):
    """triton_kernels/<module_name>.py's host function `function`, or None when it cannot be loaded."""
    if _package() is None:
        return None
    try:
        module = importlib.import_module(f"{PACKAGE}.{module_name}")
    except Exception as error:
        _LOAD_ERRORS[f"{module_name}.{function}"] = repr(error)
        return None
    found = getattr(module, function, None)
    if found is None:
        _LOAD_ERRORS[f"{module_name}.{function}"] = f"{module_name} has no {function}"
    return found


def host(module_name: str, function: str, needs: tuple = ()):
    """Marks a host wrapper as launching triton_kernels/<module_name>.py's `function`, which it
    receives as its first argument; `needs`: other host wrappers whose kernels it launches too."""

    def wrap(body):
        @functools.wraps(body)
        def run(*args):
            return body(kernel(module_name, function), *args)

        run.kernel_location = (module_name, function)
        run.needs = needs
        return run

    return wrap


def loads(wrapper) -> bool:
    """Whether the kernels a `host` wrapper launches load."""
    return kernel(*wrapper.kernel_location) is not None and all(loads(other) for other in wrapper.needs)


def available() -> bool:
    """Triton imports and the kernels' package loads."""
    return _package() is not None


def load_errors() -> dict[str, str]:
    """What failed to load, and why."""
    return dict(_LOAD_ERRORS)


@host("tree_attention", "tree_attention")
def tree_attention(
    function,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    kv_start: torch.Tensor | None,
    scale: float | None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton tree attention (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    if kv_start is None:
        kv_start = torch.zeros_like(prefix_len)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return function(q, k, v, prefix_len.contiguous(), tree_mask.contiguous(), kv_start.contiguous(), scale,
                    window, softcap)


@host("lm_head_topk", "lm_head_topk")
def lm_head_topk(function, hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k <= LM_HEAD_MAX_K (the registry sends larger k to the reference)."""
    values, indices = function(hidden, weight, k)
    return values.float(), indices.long()


@host("draft_heads", "head_states", needs=(lm_head_topk,))
def draft_heads_topk(function, hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor,
                     lm_weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All heads' blocks (one Triton launch per block layer), then the Triton LM-head top-k over the
    [N*K, H] states: row n*K + j is head j's state for row n, as in the reference."""
    states = function(hidden, weights, biases)  # [N, K, H] contiguous
    rows, heads, width = states.shape
    values, ids = lm_head_topk(states.view(rows * heads, width), lm_weight, k)
    return values.view(rows, heads, k), ids.view(rows, heads, k), states


@host("rows", "gather_rows")
def gather_rows(function, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return function(x, index)


@host("rows", "scatter_rows")
def scatter_rows(function, x: torch.Tensor, index: torch.Tensor, block: torch.Tensor) -> None:
    function(x, index, block)
