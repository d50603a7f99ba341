"""The decode loop's one wait for the device per step.

A step's results (greedy: the top-k after each node; sampling: the targets, the drafter's view
and the value checks' verdict) reach the host together: on CUDA each tensor is copied without
blocking into pinned memory and the host then waits once, for the last copy, instead of once per
`.cpu()`, `.item()` or `bool(tensor)`. On the CPU the tensors are already there.
`tests/test_host_transfers.py` counts these waits, and any other read of device memory, per step.

The CUDA copies are opt-in (TREEDEC_PINNED_READS=1) until they have run on a GPU: by default each
tensor is read with a blocking `.cpu()`, one wait each (greedy reads one tensor, sampling four).
"""

from __future__ import annotations

import os

import torch


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors on the CPU; with TREEDEC_PINNED_READS=1, one synchronisation per CUDA device
    they live on (one, unless a device map spreads them)."""
    on_device = [t for t in tensors if t.device.type == "cuda"]
    if not on_device or os.environ.get("TREEDEC_PINNED_READS") != "1":
        return tuple(t.cpu() for t in tensors)  # CPU (or another backend): no waits to merge
    copies = [t.to("cpu", non_blocking=True) if t.device.type == "cuda" else t.cpu() for t in tensors]
    for device in {t.device for t in on_device}:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        done.synchronize()  # the copies above were queued on this stream before the event
    return tuple(copies)
