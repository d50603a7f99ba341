"""Load treedec's native extensions once: `treedec._C` (C++ CPU kernels) and `treedec._cuda`.

Both are optional at import time; `cpp()` / `cuda()` return the module or None, and
`require_cpp()` / `require_cuda()` raise an ImportError that says how to build them.
"""

from __future__ import annotations

import functools
import importlib

_BUILD_HINT = {
    "_C": (
        "treedec._C (the C++ CPU kernels) is not built. It is built by `pip install -e .` "
        "(or `python setup.py build_ext --inplace` in a checkout); it needs a C++17 compiler with OpenMP."
    ),
    "_cuda": (
        "treedec._cuda (the CUDA kernels) is not built. Rebuild with nvcc on PATH on a machine with a "
        "CUDA GPU, or force it with `TREEDEC_BUILD_CUDA=1 pip install -e .`."
    ),
}


@functools.cache
def _load(name: str):
    try:
        return importlib.import_module(f"treedec.{name}"), None
    except ImportError as error:  # not built, or built against something missing here
        return None, error


def cpp():
    """treedec._C, or None when it is not built."""
    return _load("_C")[0]


def cuda():
    """treedec._cuda, or None when it is not built."""
    return _load("_cuda")[0]


def _require(name: str):
    module, error = _load(name)
    if module is None:
        raise ImportError(f"{_BUILD_HINT[name]} (import failed: {error})") from error
    return module


def require_cpp():
    return _require("_C")


def require_cuda():
    return _require("_cuda")
