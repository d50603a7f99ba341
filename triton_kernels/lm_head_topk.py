"""LM-head projection fused with a streaming top-k: logits are never materialised as [N, V].

Stage 1 (`_lm_head_topk_kernel`): one program per (block of BLOCK_R hidden rows, split of the
vocabulary). It walks its split's BLOCK_V-wide vocabulary tiles in increasing order, computes each
logit tile with tl.dot (fp32 accumulation over H in BLOCK_H steps; the tiles come through Hopper's
tensor-memory accelerator where the tensors allow it, else by masked pointer loads), and merges
the tile into a running top-k held in registers. Because tiles come in increasing index order and
ties go to the smallest index, a tile whose best logit is below every row's current k-th value
cannot change the result and is skipped without the merge. Each program writes its split's top-k
to a small buffer.

Stage 2 (`_merge_topk_kernel`): one program per hidden row merges the splits' candidates
(num_splits * KP of them, in chunks) into the final top-k.

Order: values descending; equal values in increasing index order (k=1 is argmax with the
first-index rule, as HF greedy decoding uses). A NaN logit is ranked as +inf (argmax-like) and
reported as +inf; it never crashes or produces an out-of-range index.
"""

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from ._launch import dot_settings, row_block
from ._topk import merge_into

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4: pointer loads only
    TensorDescriptor = None


@triton.jit
def _load_tiles(hidden_ptr, weight_ptr, rows64, row_valid, cols, col_valid, h, hidden_size,
                stride_hn, stride_hh, stride_wv, stride_wh):
    """Masked pointer loads of x [BLOCK_R, BLOCK_H] and W.T [BLOCK_H, BLOCK_V] (zeros outside)."""
    h_valid = h < hidden_size
    x = tl.load(
        hidden_ptr + rows64[:, None] * stride_hn + h[None, :] * stride_hh,
        mask=row_valid[:, None] & h_valid[None, :],
        other=0.0,
    )
    wt = tl.load(
        weight_ptr + cols.to(tl.int64)[None, :] * stride_wv + h[:, None] * stride_wh,
        mask=col_valid[None, :] & h_valid[:, None],
        other=0.0,
    )
    return x, wt


# Row and split counts change with every tree size: not specialising on their values (== 1,
# divisible by 16) keeps one compiled kernel per (dtype, K, BLOCK_R) instead of several.
@triton.jit(do_not_specialize=["num_rows", "tiles_per_split", "num_splits"])
def _lm_head_topk_kernel(
    hidden_ptr,  # [N, H]
    weight_ptr,  # [V, H]
    hidden_desc,  # TMA descriptors of hidden ([BLOCK_R, BLOCK_H] boxes) and weight ([BLOCK_V, BLOCK_H])
    weight_desc,  # when TMA, else None
    part_val_ptr,  # fp32 [N, num_splits, KP]
    part_idx_ptr,  # int32 [N, num_splits, KP]
    num_rows,  # N
    vocab,  # V
    hidden_size,  # H
    tiles_per_split,
    num_splits,  # runtime (the grid's axis 1): a new row count never recompiles the kernel
    stride_hn, stride_hh,
    stride_wv, stride_wh,
    K: tl.constexpr,
    KP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast tiles before tl.dot (CPU interpreter: its 16-bit dot is wrong)
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TMA: tl.constexpr,  # load tiles with Hopper's tensor-memory accelerator (out-of-range reads are zeros)
):
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    rows64 = rows.to(tl.int64)
    hcols = tl.arange(0, BLOCK_H)
    slot = tl.arange(0, KP)

    best_val = tl.full([BLOCK_R, KP], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_R, KP], 2147483647, tl.int32)
    num_tiles = tl.cdiv(vocab, BLOCK_V)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_valid = cols < vocab
        acc = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, hidden_size, BLOCK_H):
            if TMA:
                x = hidden_desc.load([pid_r * BLOCK_R, h0])  # [BLOCK_R, BLOCK_H]
                wt = weight_desc.load([tile * BLOCK_V, h0]).T  # [BLOCK_H, BLOCK_V]
            else:
                x, wt = _load_tiles(hidden_ptr, weight_ptr, rows64, row_valid, cols, col_valid, h0 + hcols,
                                    hidden_size, stride_hn, stride_hh, stride_wv, stride_wh)
            if DOT_FP32:
                x = x.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(x, wt, acc, input_precision=DOT_PRECISION)
        key = tl.where(acc != acc, float("inf"), acc)  # NaN ranks as +inf
        key_valid = row_valid[:, None] & col_valid[None, :]
        key = tl.where(key_valid, key, float("-inf"))
        # Skip the merge when no row's best logit here reaches its current k-th value: this tile's
        # indices are larger than every index held, so an equal value would lose the tie anyway.
        kth = tl.min(tl.where(slot[None, :] < K, best_val, float("inf")), 1)
        improves = row_valid & (tl.max(key, 1) >= kth)
        if tl.max(improves.to(tl.int32), 0) > 0:
            best_val, best_idx = merge_into(
                best_val, best_idx, key, cols[None, :] + rows[:, None] * 0, key_valid, K, KP
            )
    part = (rows64[:, None] * num_splits + split) * KP + slot[None, :]
    tl.store(part_val_ptr + part, best_val, mask=row_valid[:, None])
    tl.store(part_idx_ptr + part, best_idx, mask=row_valid[:, None])


@triton.jit(do_not_specialize=["num_entries"])
def _merge_topk_kernel(
    part_val_ptr,  # fp32 [N, E]
    part_idx_ptr,  # int32 [N, E]
    values_ptr,  # fp32 [N, K]
    indices_ptr,  # int64 [N, K]
    num_entries,  # E = num_splits * KP
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, KP)[None, :]
    best_val = tl.full([1, KP], float("-inf"), tl.float32)
    best_idx = tl.full([1, KP], 2147483647, tl.int32)
    for e0 in range(0, num_entries, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)[None, :]
        valid = e < num_entries
        val = tl.load(part_val_ptr + row * num_entries + e, mask=valid, other=float("-inf"))
        idx = tl.load(part_idx_ptr + row * num_entries + e, mask=valid, other=2147483647)
        best_val, best_idx = merge_into(best_val, best_idx, val, idx, valid & (idx != 2147483647), K, KP)
    tl.store(values_ptr + row * K + slot, best_val, mask=slot < K)
    tl.store(indices_ptr + row * K + slot, best_idx.to(tl.int64), mask=slot < K)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and launch settings of `_lm_head_topk_kernel` (bench/lm_head_configs.py sweeps
    them). splits_per_sm: the grid gets about splits_per_sm * SMs programs (CUDA); on the CPU the
    vocabulary is cut into that many splits."""

    block_r: int
    block_v: int
    block_h: int = 64
    num_warps: int = 4
    num_stages: int = 3
    splits_per_sm: int = 2
    tma: bool = False  # tensor-memory-accelerator loads where the tensors allow them (see `_tma_ok`)


def _tma_ok(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA reads rows whose last dimension is contiguous, from 16-byte aligned bases and strides;
    other layouts take the pointer loads."""
    if TensorDescriptor is None or hidden.dtype == torch.float32:
        return False
    return all(
        t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
        for t in (hidden, weight)
    )


def default_config(num_rows: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """From the sweeps of bench/lm_head_configs.py (H=4096, V=128256, bf16, k=8; on an H200,
    bench/results/h200/lm_head_configs.log). Past 64 rows: 128x128 tiles, 8 warps, 4 stages, one
    program per SM, TMA loads (631 us at 256 rows; 64-row tiles with pointer loads took 822 us).
    33-64 rows: 64-row tiles with 4 stages (298 us against 323 us). Fewer rows: the smallest row
    tile, TMA loads (within 2% of pointer loads). 16-bit rows take 128-wide vocabulary tiles (787
    us against 1054 us with 64 at 256 rows on an H100); fp32 takes 64. The cuBLAS-chunks path
    (lm_head_chunked.py, an experiment this function does not take) lost at every row count with
    its first top-k (K passes per segment): 855 us at best against 633 at 256 rows
    (lm_head_configs_chunked.log)."""
    block_r = row_block(num_rows)
    if device.type != "cuda":
        return LaunchConfig(block_r, 64 if dtype == torch.float32 else 128, splits_per_sm=4)
    if dtype == torch.float32:
        return LaunchConfig(block_r, 64)
    if num_rows > 64:
        return LaunchConfig(128, 128, num_warps=8, num_stages=4, splits_per_sm=1, tma=True)
    return LaunchConfig(block_r, 128, num_stages=4 if num_rows > 32 else 3, tma=True)


def _launch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    config: LaunchConfig | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    assert weight.shape[1] == hidden_size and weight.dtype == hidden.dtype
    assert 1 <= k <= min(vocab, 16)
    config = config or default_config(num_rows, hidden.dtype, hidden.device)
    values = torch.empty(num_rows, k, dtype=torch.float32, device=hidden.device)
    indices = torch.empty(num_rows, k, dtype=torch.int64, device=hidden.device)
    if num_rows == 0:
        return values, indices

    kp = max(2, triton.next_power_of_2(k))  # slots >= k stay unused
    block_h = min(config.block_h, max(16, triton.next_power_of_2(hidden_size)))
    row_blocks = triton.cdiv(num_rows, config.block_r)
    num_tiles = triton.cdiv(vocab, config.block_v)
    if num_splits is None:
        num_splits = config.splits_per_sm
        if hidden.device.type == "cuda":
            index = hidden.device.index if hidden.device.index is not None else torch.cuda.current_device()
            num_splits = triton.cdiv(config.splits_per_sm * _num_sms(index), row_blocks)
    num_splits = max(1, min(num_splits, num_tiles))
    tiles_per_split = triton.cdiv(num_tiles, num_splits)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)  # no empty split

    dot_fp32, precision = dot_settings(hidden)
    part_val = torch.empty(num_rows, num_splits, kp, dtype=torch.float32, device=hidden.device)
    part_idx = torch.empty(num_rows, num_splits, kp, dtype=torch.int32, device=hidden.device)
    tma = config.tma and _tma_ok(hidden, weight)
    hidden_desc = TensorDescriptor.from_tensor(hidden, [config.block_r, block_h]) if tma else None
    weight_desc = TensorDescriptor.from_tensor(weight, [config.block_v, block_h]) if tma else None
    _lm_head_topk_kernel[(row_blocks, num_splits)](
        hidden, weight, hidden_desc, weight_desc, part_val, part_idx,
        num_rows, vocab, hidden_size, tiles_per_split, num_splits,
        *hidden.stride(), *weight.stride(),
        K=k,
        KP=kp,
        DOT_PRECISION=precision,
        DOT_FP32=dot_fp32,
        BLOCK_R=config.block_r,
        BLOCK_V=config.block_v,
        BLOCK_H=block_h,
        TMA=tma,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    entries = num_splits * kp
    _merge_topk_kernel[(num_rows,)](
        part_val, part_idx, values, indices, entries,
        K=k,
        KP=kp,
        BLOCK_E=256,  # fixed: one compiled merge per K, whatever the number of splits
        num_warps=4,
    )
    return values, indices


def lm_head_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of hidden @ weight.T per row, without materialising the [N, V] logits.

    Parameters
    ----------
    hidden : [N, H] fp32/fp16/bf16
    weight : [V, H], same dtype (the LM head; any strides)
    k : 1 <= k <= min(V, 16)

    Returns
    -------
    values : float32 [N, k], descending (logits accumulated in fp32)
    indices : int64 [N, k]; ties go to the smallest index (k=1 equals argmax)
    """
    return _launch(hidden, weight, k)
