"""Row gather / scatter for layer-skip batching (see treedec.ops.rows).

One program per (block row, BLOCK columns): it reads its row number from `index` once, then
copies a BLOCK-wide slice of that row. Rows are viewed flat ([B, R] elements), so any trailing
shape and any dtype work.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, index_ptr, row_len, src_stride, dst_stride,
                      GATHER: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < row_len
    row = tl.load(index_ptr + i)
    if GATHER:  # dst row i <- src row index[i]
        values = tl.load(src_ptr + row * src_stride + cols, mask=inside)
        tl.store(dst_ptr + i * dst_stride + cols, values, mask=inside)
    else:  # dst row index[i] <- src (the block) row i
        values = tl.load(src_ptr + i * src_stride + cols, mask=inside)
        tl.store(dst_ptr + row * dst_stride + cols, values, mask=inside)


def _launch(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, gather: bool) -> None:
    count = index.shape[0]
    row_len = src[0].numel() if src.shape[0] else 0
    if count == 0 or row_len == 0:
        return
    grid = (count, triton.cdiv(row_len, BLOCK))
    _copy_rows_kernel[grid](src, dst, index, row_len, src.stride(0), dst.stride(0), GATHER=gather, BLOCK=BLOCK)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, ...] (rows contiguous), index int64 [A] -> x[index] as a new [A, ...] tensor."""
    out = torch.empty((index.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _launch(x, out, index.contiguous(), gather=True)
    return out


def scatter_rows(x: torch.Tensor, index: torch.Tensor, block: torch.Tensor) -> None:
    """In place: x[index[i]] = block[i] (x contiguous, indices distinct)."""
    _launch(block.contiguous(), x, index.contiguous(), gather=False)
