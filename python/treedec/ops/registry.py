"""The op registry: every op declared once, and the one place that decides which implementation runs.

An `Op` is declared next to its public wrapper (ops/<op>.py) with its name, its schema, the
pure-torch reference, the native implementations per backend and a fake (output metadata only),
and it is registered as a `torch.library` custom op, so torch.compile and CUDA graphs see one
opaque call. `Op.backend(device, *args)` decides, for these arguments on that device:

1. TREEDEC_BACKEND=reference: the reference.
2. A named backend (cpp, cuda, triton): that backend when it is built, runs on the device and
   implements the op, else the reference; naming one that is not built raises.
3. auto (the default): the device's backends in order (cpu: cpp; cuda: cuda, then triton) that
   are built and implement the op, else the reference.

Then the backend's rules for the arguments: `declines` (what its kernel cannot take: a dtype, a
k past its limit, strided rows) always apply; `avoids` (what its kernel runs but loses on:
fp32 LM heads on a GPU) only under auto. A backend passed over this way is a fallback: logged
once per (op, backend, reason) on the "treedec.ops" logger and counted (`fallbacks()`), never
silent. `treedec info` prints every op's decision on this machine (`describe`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
LOG = logging.getLogger("treedec.ops")

OPS: dict[str, Op] = {}  # name -> op, in declaration order
_FALLBACKS: Counter = Counter()  # (op, backend, reason) -> times


@dataclass(frozen=True)
class Rule:
    """A condition on an op's arguments under which a backend is passed over. `check(*args)`
    returns the reason (for the log) or None; `when` says it in words (for `treedec info`)."""

    when: str
    check: Callable[..., str | None]


class Op:
    def __init__(self, name: str, schema: str, reference: Callable, fake: Callable, mutates: tuple[str, ...] = (),
                 declines: dict[str, list[Rule]] | None = None, avoids: dict[str, list[Rule]] | None = None,
                 **native: Callable):
        """`native`: backend -> implementation (same arguments as the reference). `schema`: the
        custom op's, whose last argument is the backend's name (str backend)."""
        if name in OPS:
            raise ValueError(f"op {name!r} is declared twice")
        unknown = set(native) - set(BACKENDS)
        if unknown:
            raise ValueError(f"op {name!r}: unknown backend(s) {sorted(unknown)}")
        self.name = name
        self.implementations = {"reference": reference, **native}
        self._declared = dict(native)  # what `implements` asks about loading, even if a test swaps one in
        self.declines = declines or {}
        self.avoids = avoids or {}

        def body(*args):  # the custom op's body: the arguments, then the backend chosen eagerly
            *inputs, backend = args
            return self.implementations[backend](*inputs)

        self.custom_op = torch.library.custom_op(f"treedec::{name}", body, mutates_args=mutates, schema=schema)
        self.custom_op.register_fake(lambda *args: fake(*args[:-1]))
        OPS[name] = self

    def __call__(self, *args, device: torch.device | None = None):
        """Run the op on validated arguments on the backend that `backend()` decides."""
        return self.run(self.backend(device if device is not None else _first_device(args), *args), *args)

    def run(self, backend: str, *args):
        """Run the op on `backend` (decided by `backend()` for these arguments): through the custom
        op while torch.compile traces (one opaque call), else directly."""
        if torch.compiler.is_compiling():
            return self.custom_op(*args, backend)
        return self.implementations[backend](*args)

    def implementation(self, backend: str) -> Callable:
        """The function that runs the op on `backend` (benchmarks time each one)."""
        return self.implementations[backend]

    def implements(self, backend: str) -> bool:
        """Whether `backend` has its own kernel for the op and can load it."""
        if backend not in self._declared:
            return False
        return backend != "triton" or triton_kernel_loads(self._declared[backend])

    def backend(self, device: torch.device, *args) -> str:
        """The backend that runs the op for `args` on `device` (see the module docstring); with no
        `args`, the decision before the argument rules."""
        device = torch.device(device)
        order, forced = candidates(device)
        for backend in order:
            if not (built(backend) and runs_on(backend, device) and self.implements(backend)):
                continue
            reason = None
            if args:
                reason = next((found for rule in self._rules(backend, forced)
                               if (found := rule.check(*args)) is not None), None)
            if reason is None:
                return backend
            _fallback(self.name, backend, reason)
        return "reference"

    def _rules(self, backend: str, forced: bool) -> list[Rule]:
        """The rules that may pass `backend` over: its declines, and under auto its avoids too."""
        return self.declines.get(backend, []) + ([] if forced else self.avoids.get(backend, []))

    def describe(self, device: torch.device) -> str:
        """The decision on `device` in words: the backend, and where its rules send the reference."""
        backend = self.backend(device)
        rules = self._rules(backend, forced=requested_backend() != "auto")
        if not rules:
            return backend
        return f"{backend} (reference for {'; '.join(rule.when for rule in rules)})"


def _first_device(args) -> torch.device:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0].device
    raise ValueError("an op needs a tensor argument to decide its device")


def _fallback(op: str, backend: str, reason: str) -> None:
    key = (op, backend, reason)
    if key not in _FALLBACKS:
        LOG.info("treedec.ops.%s: %s passed over for the reference: %s", op, backend, reason)
    _FALLBACKS[key] += 1


def fallbacks() -> dict[tuple[str, str, str], int]:
    """How often each (op, backend, reason) sent an op to the reference since the last reset."""
    return dict(_FALLBACKS)


def reset_fallbacks() -> None:
    _FALLBACKS.clear()


def requested_backend() -> str:
    name = os.environ.get("TREEDEC_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"TREEDEC_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@functools.cache
def built(name: str) -> bool:
    """Whether backend `name` is built and importable in this install (not whether a device is present)."""
    if name == "reference":
        return True
    if name in ("cpp", "cuda"):
        from .. import _native

        return (_native.cpp() if name == "cpp" else _native.cuda()) is not None
    if name == "triton":
        from . import _triton

        return _triton.available()
    return False


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


def triton_kernel_loads(host) -> bool:
    from . import _triton

    return _triton.loads(host)


def available_backends() -> dict[str, bool]:
    """Which backends are built and importable in this install."""
    return {name: built(name) for name in BACKENDS if name != "auto"}


def candidates(device: torch.device) -> tuple[tuple[str, ...], bool]:
    """The native backends TREEDEC_BACKEND lets an op try on `device`, in order (none: the
    reference), and whether one was named (forced). Naming one that is not built raises."""
    requested = requested_backend()
    if requested == "reference":
        return (), True
    if requested == "auto":
        return AUTO_ORDER.get(torch.device(device).type, ()), False
    if not built(requested):
        raise RuntimeError(
            f"TREEDEC_BACKEND={requested} was requested but that backend is not built in this install "
            "(`treedec info` lists what is available); unset it or use TREEDEC_BACKEND=reference"
        )
    return (requested,), True


def device_backend(device: torch.device) -> str:
    """The device's first native backend under TREEDEC_BACKEND, for ops without their own choice."""
    order, _ = candidates(device)
    return next((b for b in order if built(b) and runs_on(b, device)), "reference")
