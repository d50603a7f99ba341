"""The decoder layers' linear projections through treedec's few-row kernel, during treedec's steps.

A verify step multiplies T tree nodes (a few rows) by every projection weight of every layer.
On some CPUs torch's fp32 matmul reads a weight that is not in cache at well under the memory
system's rate for 1 to 16 rows, so a T = 8 step cost about 1.5x a T = 1 step and small trees
could not pay; `ops.linear_rows` streams each weight once for all rows at about the cost of one
row. Which is faster depends on the CPU: on an AMD EPYC (Zen 4) the kernel won at every row
count up to 16, on an Intel Xeon with AMX torch won at 1 and 2 rows by about 25% and lost from
4 on. So no CPU's answer is built in: `LinearRouting` times the loop's own verify forwards with
each, per row count, and keeps the faster (bench/results/loop_overhead/).

Only plain `nn.Linear` modules on CPU tensors are routed, only for inputs of at most MAX_ROWS
rows, and only inside treedec's own decode loop (`routed`): a fallback to HF's `generate`, and
anything else run on the model, keep torch's layers.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from . import ops, parallel

MAX_ROWS = 16  # beyond this torch's GEMM catches up on every CPU measured (bench/kernels.py, linear_rows)
ROUTED_DTYPES = (torch.float32, torch.bfloat16)


class LinearRouting:
    """Per row count, whether the few-row kernel or torch's linear runs the projections: decided
    by timing real verify forwards with each, alternately, `trials` times each, and keeping the
    one with the lower median (torch on a tie within `margin`: the plain path). Until a row count
    is decided its forwards take the arm under trial; forwards the loop does not time (a drafter's)
    take the decided arm, or the kernel. One per model, kept across calls (patching.LearnedState)."""

    def __init__(self, trials: int = 3, margin: float = 0.02):
        self.trials, self.margin = trials, margin
        self.kernel: dict[int, bool] = {}  # rows -> decided: the kernel (True) or torch (False)
        self.samples: dict[tuple[int, bool], list[float]] = {}  # (rows, kernel) -> forward seconds
        self.trying = True  # the arm forwards of an undecided row count take

    def uses_kernel(self, rows: int) -> bool:
        return self.kernel.get(rows, self.trying)

    def start(self, rows: int) -> bool:
        """Before a timed forward of `rows` rows: whether its time is a trial (`finish` records it)."""
        if rows in self.kernel or not 0 < rows <= MAX_ROWS:
            return False
        kernel_runs = len(self.samples.get((rows, True), ()))
        torch_runs = len(self.samples.get((rows, False), ()))
        self.trying = kernel_runs <= torch_runs
        return True

    def finish(self, rows: int, seconds: float) -> None:
        """The trial forward started by `start(rows)` took `seconds`."""
        self.samples.setdefault((rows, self.trying), []).append(seconds)
        self.trying = True
        runs = [sorted(self.samples.get((rows, arm), ())) for arm in (True, False)]
        if min(map(len, runs)) >= self.trials:
            kernel, plain = (r[len(r) // 2] for r in runs)
            self.kernel[rows] = kernel < plain * (1 - self.margin)

    def as_dict(self) -> dict[int, str]:
        return {rows: "kernel" if kernel else "torch" for rows, kernel in sorted(self.kernel.items())}


def few_row_forward(module: torch.nn.Linear, run, routing: LinearRouting, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward, through `run` (ops.loop_linear_rows's function) when x is a CPU tensor of
    the weight's dtype and width with at most MAX_ROWS rows and `routing` picks the kernel for
    that many rows (torch's linear, and its errors, otherwise)."""
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    unfit = x.dtype != module.weight.dtype or x.device.type != "cpu" or width != module.in_features
    if not 0 < rows <= MAX_ROWS or unfit or torch.is_grad_enabled() or not routing.uses_kernel(rows):
        return torch.nn.functional.linear(x, module.weight, module.bias)  # nn.Linear.forward's own call
    out = run(x.reshape(rows, width), module.weight, module.bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def routable_linears(layers: torch.nn.Module) -> list[torch.nn.Linear]:
    """The plain nn.Linear modules under `layers` that the kernel can run (CPU, fp32/bf16, C++
    built, a weight that is not a DTensor) and that nothing else has wrapped (an instance
    `forward`, e.g. an accelerate hook or tensor parallelism's)."""
    if ops.choose_backend(torch.device("cpu"), "linear_rows") != "cpp":
        return []
    return [
        m for m in layers.modules()
        if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in ROUTED_DTYPES
        and "forward" not in m.__dict__ and not parallel.is_distributed(m.weight)
    ]  # fmt: skip


@contextmanager
def routed(modules: list[torch.nn.Linear], routing: LinearRouting | None = None):
    """Within the block, `modules` run few-row inputs through linear_rows where `routing` (None:
    always) picks it, looked up once for the block (ops.loop_linear_rows): the checks and backend
    choice of ops.linear_rows cost about 9 us a call, about 2 ms of a 50 ms step for SmolLM2's 210
    projections. Their weights are CPU tensors of a routed dtype (routable_linears), and
    few_row_forward checks each input."""
    run = ops.loop_linear_rows(torch.device("cpu")) if modules else None
    routing = routing if routing is not None else LinearRouting()
    for module in modules:
        module.forward = functools.partial(few_row_forward, module, run, routing)
    try:
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)
