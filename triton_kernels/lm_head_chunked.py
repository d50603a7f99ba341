"""LM-head top-k for many rows: cuBLAS logits of one vocabulary chunk at a time, a Triton top-k over each.

Past a few dozen rows the projection is compute-bound (256 rows x H=4096 x V=128256 is 269 GFLOP),
and the fused Triton kernel, without warp specialisation, runs at about two thirds of cuBLAS on
Hopper (597-633 us against 395-404 us for the logits alone on an H200). This path lets cuBLAS do
the matmul and keeps only the top-k in Triton. The [N, V] logits are still never materialised:
one [N, chunk_v] fp32 chunk exists at a time. `chunk_width(N)` gives the width whose chunk is 16
MB, which stays in L2 while its top-k reads it (bench/lm_head_configs.py sweeps around it).

Not the default: `lm_head_topk.default_config` never picks it. Measured on an H200 with a K-pass
merge per segment it lost everywhere (855-1325 us at 256 rows against 633 for the fused kernel,
bench/results/h200/lm_head_configs_chunked.log): the top-k, not the matmul, took the time,
because a segment merges whenever any of its rows has a logit above that row's k-th, which is
nearly always. The segments now insert only those logits (`_topk.insert_candidates`): after the
first chunk a row's k-th is high, so a segment takes one or two passes instead of K. This is
untimed on a GPU; bench/lm_head_configs.py sweeps this path beside the fused kernel. (The same
insertion in the fused kernel, as rank-order passes at fd89d91, did not pay: 656-675 against 631
us. There the matmul, not the merge, sets the pace.)

Per chunk (in increasing vocabulary order):
1. `torch.mm` writes the chunk's fp32 logits (fp32 accumulation, like the fused kernel).
2. `_segment_topk_kernel`: one program per (block of rows, BLOCK_S-wide segment) takes the
   segment's top-k into its slot of a per-row candidate buffer. A segment whose best logit is
   below the row's running k-th value cannot enter the result and is skipped without a merge, so
   after the first chunk most programs read their tile once and write nothing but -inf.
3. `_merge_running_kernel`: one program per row merges the running top-k (slot 0) with the
   segments' candidates back into slot 0; after the last chunk it writes the result instead.

Order and NaN handling are `lm_head_topk`'s: values descending, ties to the smallest index (the
running list only holds smaller indices than a later chunk's), NaN ranked and reported as +inf.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from ._topk import insert_candidates, merge_into

EMPTY = 2147483647  # the index of an empty slot
SENTINEL = tl.constexpr(EMPTY)  # the same inside kernels


@dataclasses.dataclass(frozen=True)
class ChunkedConfig:
    """chunk_v vocabulary columns per matmul; the top-k reads [block_r, block_s] tiles of them."""

    chunk_v: int = 16384
    block_r: int = 16
    block_s: int = 512
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_r", "block_s", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"{name} = {value!r} must be a power of two")
        if not isinstance(self.chunk_v, int) or self.chunk_v < 1:
            raise ValueError(f"chunk_v = {self.chunk_v!r} must be an int >= 1")


@triton.jit(do_not_specialize=["num_rows", "width", "col_offset", "row_entries"])
def _segment_topk_kernel(
    logits_ptr,  # [N, width] (any float dtype), row stride stride_ln, columns contiguous
    part_val_ptr,  # fp32 [N, row_entries]: slot 0 (KP entries) the running top-k, then one slot per segment
    part_idx_ptr,  # int32, same layout
    num_rows,
    width,  # columns in this chunk
    col_offset,  # vocabulary index of the chunk's first column
    row_entries,
    stride_ln,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_r = tl.program_id(0)
    segment = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    rows64 = rows.to(tl.int64)
    cols = segment * BLOCK_S + tl.arange(0, BLOCK_S)
    key_valid = row_valid[:, None] & (cols < width)[None, :]
    x = tl.load(logits_ptr + rows64[:, None] * stride_ln + cols[None, :], mask=key_valid, other=float("-inf"))
    key = x.to(tl.float32)
    key = tl.where(key != key, float("inf"), key)  # NaN ranks as +inf
    key = tl.where(key_valid, key, float("-inf"))

    row_base = rows64 * row_entries
    kth = tl.load(part_val_ptr + row_base + (K - 1), mask=row_valid, other=float("inf"))
    # >=, not >: a value equal to the k-th loses the tie (its index is larger) but the merge decides
    improves = row_valid & (tl.max(key, 1) >= kth)
    slot = tl.arange(0, KP)
    best_val = tl.full([BLOCK_R, KP], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_R, KP], SENTINEL, tl.int32)
    if tl.max(improves.to(tl.int32), 0) > 0:
        key_idx = (col_offset + cols)[None, :] + rows[:, None] * 0
        cand = key_valid & (key >= kth[:, None])
        best_val, best_idx = insert_candidates(best_val, best_idx, key, key_idx, cand, K, KP)
    out = row_base[:, None] + (segment + 1) * KP + slot[None, :]
    tl.store(part_val_ptr + out, best_val, mask=row_valid[:, None])
    tl.store(part_idx_ptr + out, best_idx, mask=row_valid[:, None])


@triton.jit(do_not_specialize=["num_entries", "row_entries"])
def _merge_running_kernel(
    part_val_ptr,  # fp32 [N, row_entries]
    part_idx_ptr,  # int32 [N, row_entries]
    values_ptr,  # fp32 [N, K] (FINAL)
    indices_ptr,  # int64 [N, K] (FINAL)
    num_entries,  # entries in use: slot 0 and this chunk's segments (a short last chunk has fewer)
    row_entries,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    FINAL: tl.constexpr,  # write the result, else the running top-k back to slot 0
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, KP)[None, :]
    best_val = tl.full([1, KP], float("-inf"), tl.float32)
    best_idx = tl.full([1, KP], SENTINEL, tl.int32)
    base = row * row_entries
    for e0 in range(0, num_entries, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)[None, :]
        valid = e < num_entries
        val = tl.load(part_val_ptr + base + e, mask=valid, other=float("-inf"))
        idx = tl.load(part_idx_ptr + base + e, mask=valid, other=SENTINEL)
        best_val, best_idx = merge_into(best_val, best_idx, val, idx, valid & (idx != SENTINEL), K, KP)
    # every load above precedes this store in the one program that owns the row
    if FINAL:
        tl.store(values_ptr + row * K + slot, best_val, mask=slot < K)
        tl.store(indices_ptr + row * K + slot, best_idx.to(tl.int64), mask=slot < K)
    else:
        tl.store(part_val_ptr + base + slot, best_val)
        tl.store(part_idx_ptr + base + slot, best_idx)


def chunk_width(num_rows: int) -> int:
    """Vocabulary columns per chunk: 16 MB of fp32 logits (4M values), which the H100's and H200's
    50 MB L2 holds between the matmul that writes them and the top-k that reads them; at least
    4096 columns, so that a chunk's matmul still fills the GPU."""
    per_row = (4 << 20) // max(1, num_rows)
    return max(4096, min(65536, 1 << (per_row.bit_length() - 1)))  # a power of two at most per_row


def fp32_logits_available(device: torch.device) -> bool:
    """Whether torch can write a 16-bit matmul's fp32-accumulated result as fp32 (`mm` with
    `out_dtype`: torch 2.11 on the H200 has it). On the CPU the chunk is upcast before the matmul."""
    return device.type != "cuda" or hasattr(torch.ops.aten.mm, "dtype_out")


def _project(hidden: torch.Tensor, weight_chunk: torch.Tensor, out: torch.Tensor) -> None:
    """out[N, w] = hidden @ weight_chunk.T, accumulated in fp32 and stored as fp32 (rounded to the
    inputs' 16 bits first where torch cannot write a 16-bit matmul's result as fp32). fp32 inputs
    follow torch's matmul precision setting (TF32 where it allows it), unlike the fused kernel's
    full-precision fp32 path; `default_config` sends fp32 to the fused kernel."""
    if hidden.dtype == torch.float32:
        torch.mm(hidden, weight_chunk.T, out=out)
    elif hidden.device.type == "cuda" and fp32_logits_available(hidden.device):
        torch.mm(hidden, weight_chunk.T, out_dtype=torch.float32, out=out)
    elif hidden.device.type == "cuda":  # no `out_dtype`: 16-bit logits, as the reference rounds them
        out.copy_(torch.mm(hidden, weight_chunk.T))
    else:  # CPU (the interpreter tests): upcast, then an fp32 matmul
        torch.mm(hidden.float(), weight_chunk.T.float(), out=out)


def launch(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, config: ChunkedConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    values = torch.empty(num_rows, k, dtype=torch.float32, device=hidden.device)
    indices = torch.empty(num_rows, k, dtype=torch.int64, device=hidden.device)
    if num_rows == 0:
        return values, indices
    kp = max(2, triton.next_power_of_2(k))
    chunk_v = min(config.chunk_v, vocab)
    segments = triton.cdiv(chunk_v, config.block_s)
    row_entries = (1 + segments) * kp
    part_val = torch.full((num_rows, row_entries), float("-inf"), dtype=torch.float32, device=hidden.device)
    part_idx = torch.full((num_rows, row_entries), EMPTY, dtype=torch.int32, device=hidden.device)
    chunk = torch.empty(num_rows * chunk_v, dtype=torch.float32, device=hidden.device)
    row_blocks = triton.cdiv(num_rows, config.block_r)
    for start in range(0, vocab, chunk_v):
        width = min(chunk_v, vocab - start)
        logits = chunk[: num_rows * width].view(num_rows, width)
        _project(hidden, weight[start : start + width], logits)
        chunk_segments = triton.cdiv(width, config.block_s)
        _segment_topk_kernel[(row_blocks, chunk_segments)](
            logits, part_val, part_idx, num_rows, width, start, row_entries, logits.stride(0),
            K=k, KP=kp, BLOCK_R=config.block_r, BLOCK_S=config.block_s, num_warps=config.num_warps,
        )
        _merge_running_kernel[(num_rows,)](
            part_val, part_idx, values, indices, (1 + chunk_segments) * kp, row_entries,
            K=k, KP=kp, BLOCK_E=256, FINAL=start + width >= vocab, num_warps=4,
        )
    return values, indices
