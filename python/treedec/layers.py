"""The decoder layers' linear projections through treedec's few-row kernel, during treedec's steps.

A verify step multiplies T tree nodes (a few rows) by every projection weight of every layer.
On the CPU torch's fp32 matmul reads a weight that is not in cache at well under the memory
system's rate for 1 to 16 rows, so a T = 8 step cost about 1.5x a T = 1 step here and small
trees could not pay. `ops.linear_rows` streams each weight once for all rows at about the cost
of one row. Only plain `nn.Linear` modules on CPU tensors are routed, only for inputs of at most
MAX_ROWS rows, and only inside treedec's own decode loop (`routed`): a fallback to HF's
`generate`, and anything else run on the model, keep torch's layers.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from . import ops

MAX_ROWS = 16  # beyond this torch's GEMM catches up (bench/kernels.py, linear_rows rows)
ROUTED_DTYPES = (torch.float32, torch.bfloat16)


def few_row_forward(module: torch.nn.Linear, run, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward, through `run` (ops.loop_linear_rows's function) when x is a CPU tensor of
    the weight's dtype and width with at most MAX_ROWS rows (torch's layer, and its errors,
    otherwise)."""
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    unfit = x.dtype != module.weight.dtype or x.device.type != "cpu" or width != module.in_features
    if not 0 < rows <= MAX_ROWS or unfit or torch.is_grad_enabled():
        return torch.nn.Linear.forward(module, x)
    out = run(x.reshape(rows, width), module.weight, module.bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def routable_linears(layers: torch.nn.Module) -> list[torch.nn.Linear]:
    """The plain nn.Linear modules under `layers` that the kernel can run (CPU, fp32/bf16, C++
    built) and that nothing else has wrapped (an instance `forward`, e.g. an accelerate hook)."""
    if ops.choose_backend(torch.device("cpu"), "linear_rows") != "cpp":
        return []
    return [
        m for m in layers.modules()
        if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in ROUTED_DTYPES
        and "forward" not in m.__dict__
    ]  # fmt: skip


@contextmanager
def routed(modules: list[torch.nn.Linear]):
    """Within the block, `modules` run few-row inputs through linear_rows, looked up once for the
    block (ops.loop_linear_rows): the checks and backend choice of ops.linear_rows cost about 9 us
    a call on this CPU, about 2 ms of a 50 ms step for SmolLM2's 210 projections. Their weights are
    CPU tensors of a routed dtype (routable_linears), and few_row_forward checks each input."""
    run = ops.loop_linear_rows(torch.device("cpu")) if modules else None
    for module in modules:
        module.forward = functools.partial(few_row_forward, module, run)
    try:
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)
