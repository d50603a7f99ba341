"""Launch choices the Triton kernels share (host side only)."""

import torch


def dot_settings(x: torch.Tensor) -> tuple[bool, str]:
    """(DOT_FP32, DOT_PRECISION) for tensors like `x`. Under TRITON_INTERPRET=1 (CPU tensors)
    tl.dot runs in fp32 ("ieee"); on a GPU, fp32 inputs keep full precision and 16-bit ones
    accumulate in fp32 on tensor cores ("tf32" only matters for fp32 operands)."""
    dot_fp32 = x.device.type == "cpu"
    return dot_fp32, "ieee" if x.dtype == torch.float32 or dot_fp32 else "tf32"


def row_block(num_rows: int) -> int:
    """Rows per program for the few-row projections (LM-head top-k, draft-head blocks): the
    smallest of 16 (tl.dot's minimum), 32 and 64 that holds them, so a verify of a few nodes
    does not pay for 64-row tiles and larger batches still fill the tensor cores."""
    return 16 if num_rows <= 16 else (32 if num_rows <= 32 else 64)
