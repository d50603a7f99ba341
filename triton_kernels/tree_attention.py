"""Tree attention: flash-attention over the prefix, then the tree block under a packed mask.

Contract (docs/design.md, "Tree attention"): query node i of sequence b sees cache rows
[kv_start[b], prefix_len[b]) and the tree rows prefix_len[b] + j whose bit j is set in
tree_mask[b, i] (and which are >= kv_start[b]). A query row that sees nothing (left-padding rows
during prefill) produces zeros.

Layout of the work: one program per (block of BLOCK_M packed query rows, sequence b, kv head,
kv split). The query heads of one GQA group are packed into the M dimension (row m is query
head kv_head * group + m // T, node m % T), so each K/V tile is loaded once for the whole group,
as FlashInfer and SGLang do for decode. Each program streams its part of the prefix in BLOCK_N
tiles with an online softmax (base-2 exponentials, fp32 accumulators), then the T tree rows,
reading the ancestor bits of each (query node, tree node) pair from the packed mask. No dense
[T, S] mask is ever built.

Sliding window (WINDOW): node i sits at position prefix_len[b] + depth[b, i] and sees only rows
fewer than `window` positions behind it (a prefix row r sits at r, tree node j at prefix_len[b] +
depth[b, j]), as reference.dense_tree_mask says; the prefix rows no node can see (below
prefix_len - window + 1) are never read. Soft-cap (SOFTCAP, Gemma 2): each scaled score s becomes
softcap * tanh(s / softcap) before the mask and the softmax.

Split-KV: when there are too few programs to fill the GPU and the cache is long, the prefix of
each sequence is cut into num_splits equal chunks (about one wave of programs in all) (computed in the kernel from prefix_len, so no
host sync and graph-capturable); the last split also takes the tree block. Each split writes a
normalised partial output and its log-sum-exp, and `_combine_kernel` merges them.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ._launch import dot_settings

LOG2E = 1.4426950408889634


# The tree size and split count change from step to step: not specialising on their values keeps
# the number of compiled variants to the constexpr combinations.
@triton.jit(do_not_specialize=["num_nodes", "num_splits", "window"])
def _tree_attention_kernel(
    q_ptr,  # [B, Hq, T, D]
    k_ptr,  # [B, Hkv, S, D]
    v_ptr,  # [B, Hkv, S, D]
    out_ptr,  # [B, Hq, T, D] (not SPLIT_KV)
    part_o_ptr,  # fp32 [B, Hq, T, num_splits, BLOCK_D] (SPLIT_KV)
    part_lse_ptr,  # fp32 [B, Hq, T, num_splits], base-2 log-sum-exp (SPLIT_KV)
    prefix_len_ptr,  # int32 [B]
    kv_start_ptr,  # int32 [B] (read only if HAS_KV_START)
    tree_mask_ptr,  # int32 [B, T, W], little-endian bits
    depth_ptr,  # int32 [B, T] contiguous: each node's depth (read only if WINDOW)
    num_nodes,  # T
    num_kv_heads,  # Hkv
    group,  # Hq // Hkv
    head_dim,  # D
    qk_scale,  # softmax scale * log2(e); the softmax scale alone with SOFTCAP (applied before the cap)
    num_splits,  # programs along axis 2, each over a share of the prefix (runtime: no recompile per value)
    window,  # WINDOW: the sliding window
    softcap,  # SOFTCAP: the logit soft-cap
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_mt, stride_mw,
    HAS_KV_START: tl.constexpr,
    SPLIT_KV: tl.constexpr,  # num_splits > 1: write partial results for _combine_kernel
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast tiles before tl.dot (CPU interpreter: its 16-bit dot is wrong)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = (pid_bh % num_kv_heads).to(tl.int64)

    # Packed query rows: m -> (query head kv_head * group + g, node i).
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = m < group * num_nodes
    g = m // num_nodes
    node = m - g * num_nodes
    q_head = kv_head * group + g
    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim

    q_ptrs = q_ptr + b * stride_qb + q_head[:, None] * stride_qh + node[:, None] * stride_qt + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    prefix = tl.load(prefix_len_ptr + b)
    if HAS_KV_START:
        start = tl.load(kv_start_ptr + b)
    else:
        start = prefix * 0
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    first = start  # the first prefix row some node of the tree may see
    if WINDOW:
        depth_row = depth_ptr + b * num_nodes
        q_at = prefix + tl.load(depth_row + node, mask=row_valid, other=0)  # [BLOCK_M] positions
        first = tl.maximum(start, prefix - window + 1)  # the root (depth 0) sees furthest back
    if SOFTCAP:
        cap_log2 = softcap * 1.4426950408889634  # the cap, then base-2 exponentials

    # This split's share of the prefix [first, prefix).
    if not SPLIT_KV:
        lo = first
        hi = prefix
        tree_end = num_nodes
    else:
        span = tl.maximum(prefix - first, 0)
        chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
        lo = first + split * chunk
        hi = tl.minimum(lo + chunk, prefix)
        tree_end = tl.where(split == num_splits - 1, num_nodes, 0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite, so a fully masked tile gives alpha = 1
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Prefix: every row in [lo, hi) is visible to every query row.
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_valid = cols < hi
        kt = tl.load(
            k_base + cols[None, :] * stride_ks + d[:, None] * stride_kd,
            mask=col_valid[None, :] & d_valid[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:
            s = cap_log2 * _tanh(s / softcap)
        visible = col_valid[None, :]
        if WINDOW:
            visible = visible & (q_at[:, None] - cols[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(
            v_base + cols[:, None] * stride_vs + d[None, :] * stride_vd,
            mask=col_valid[:, None] & d_valid[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if DOT_FP32:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new

    # Tree block: tree node j sits at row prefix + j; visible iff bit j of tree_mask[b, node] is set.
    mask_row = tree_mask_ptr + b * stride_mb + node[:, None] * stride_mt
    for j0 in range(0, tree_end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        rows = prefix + j
        col_valid = (j < num_nodes) & (rows >= start)
        kt = tl.load(
            k_base + rows[None, :] * stride_ks + d[:, None] * stride_kd,
            mask=col_valid[None, :] & d_valid[:, None],
            other=0.0,
        )
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:
            s = cap_log2 * _tanh(s / softcap)
        words = tl.load(
            mask_row + (j[None, :] >> 5) * stride_mw,
            mask=row_valid[:, None] & col_valid[None, :],
            other=0,
        )  # [BLOCK_M, BLOCK_N] int32: the mask word holding bit j of row `node`
        visible = ((words >> (j[None, :] & 31)) & 1) != 0
        if WINDOW:
            k_at = prefix + tl.load(depth_row + j, mask=col_valid, other=0)  # [BLOCK_N]
            visible = visible & (q_at[:, None] - k_at[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(
            v_base + rows[:, None] * stride_vs + d[None, :] * stride_vd,
            mask=col_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        if DOT_FP32:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw nothing has acc = 0: zeros
    if not SPLIT_KV:
        o_ptrs = (
            out_ptr + b * stride_ob + q_head[:, None] * stride_oh + node[:, None] * stride_ot + d[None, :] * stride_od
        )
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    else:
        flat_row = (b * num_kv_heads * group + q_head) * num_nodes + node  # (b, h, i) -> row of [B*Hq*T]
        part_row = flat_row * num_splits + split
        tl.store(part_o_ptr + part_row[:, None] * BLOCK_D + d[None, :], out, mask=row_valid[:, None])
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=row_valid)


@triton.jit
def _tanh(x):
    """tanh without overflow: exp of -2|x| lies in (0, 1]."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit(do_not_specialize=["num_nodes", "num_splits"])
def _combine_kernel(
    part_o_ptr,  # fp32 [B*Hq*T, num_splits, BLOCK_D]
    part_lse_ptr,  # fp32 [B*Hq*T, num_splits]
    out_ptr,  # [B, Hq, T, D]
    num_q_heads,
    num_nodes,
    head_dim,
    num_splits,
    stride_ob, stride_oh, stride_ot, stride_od,
    SPLITS_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, h, i) flattened
    node = row % num_nodes
    head = (row // num_nodes) % num_q_heads
    b = row // (num_nodes * num_q_heads)
    sp = tl.arange(0, SPLITS_P2)
    sp_valid = sp < num_splits
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(part_lse_ptr + row * num_splits + sp, mask=sp_valid, other=float("-inf"))
    top = tl.max(lse, 0)
    empty = lse == float("-inf")
    weight = tl.where(empty, 0.0, tl.exp2(tl.where(empty, 0.0, lse) - tl.where(empty, 0.0, top)))
    part = tl.load(
        part_o_ptr + (row * num_splits + sp[:, None]) * BLOCK_D + d[None, :], mask=sp_valid[:, None], other=0.0
    )
    total = tl.sum(weight, 0)
    out = tl.sum(part * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    o_ptrs = out_ptr + b * stride_ob + head * stride_oh + node * stride_ot + d * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms_on(device: torch.device) -> int:
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _choose_splits(device: torch.device, programs: int, cache_len: int, block_n: int) -> int:
    """Split the prefix only when the grid would not fill the GPU, up to about one wave.

    One wave, not more: on an H100 (132 SMs) at T=64, prefix 4096, llama3-8b heads, 4 splits of
    32 programs ran in 29 us and 9 splits in 47 us (bench/tree_attention_configs.py,
    bench/results/h100/tree_attention_configs.csv): extra waves re-read the query block and add
    partial results to combine. Uses static shapes only (cache capacity, not prefix_len), so the
    choice never syncs."""
    if device.type != "cuda":
        return 1
    sms = _sms_on(device)
    if programs >= sms:
        return 1
    return max(1, min(sms // programs, cache_len // (4 * block_n), 32))


def _tile_config(device: torch.device, dtype: torch.dtype, rows: int, programs_at_64: int, block_d: int):
    """(BLOCK_M, num_stages) for a launch, from the configuration sweep on an H100.

    - 128-row query tiles (8 warps, `_warps_for`) once 64-row tiles already give every SM a program: each
      K/V tile is then read by half as many programs (llama3-8b heads, B=8, T=64, prefix 4096:
      94 us against 148 us with 64-row tiles);
    - otherwise 64-row tiles (16/32 for small trees), and the prefix is split instead;
    - three pipeline stages for 16-bit tiles up to D=128 (29 vs 30 us and 94 vs 122 us against
      two); fp32 and wider heads keep the two their GPU tests ran with (three stages of their
      tiles may not fit shared memory).
    The CPU interpreter keeps the small tiles (no SM count; speed is meaningless there).
    """
    sixteen_bit = dtype in (torch.float16, torch.bfloat16) and block_d <= 128
    if rows <= 32:
        block_m = max(16, triton.next_power_of_2(rows))
    elif (
        device.type == "cuda"
        and sixteen_bit
        and programs_at_64 >= _sms_on(device)
    ):
        block_m = 128
    else:
        block_m = 64
    return block_m, 3 if sixteen_bit else 2


def _warps_for(block_m: int, block_d: int) -> int:
    return 4 if block_m * block_d <= 64 * 128 else 8


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    kv_start: torch.Tensor | None,
    scale: float | None,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    batch, num_q_heads, num_nodes, head_dim = q.shape
    num_kv_heads, cache_len = k.shape[1], k.shape[2]
    assert k.shape == v.shape and k.shape[0] == batch and k.shape[3] == head_dim
    assert num_q_heads % num_kv_heads == 0
    assert tree_mask.shape == (batch, num_nodes, triton.cdiv(num_nodes, 32))
    assert prefix_len.dtype == torch.int32 and tree_mask.dtype == torch.int32
    assert kv_start is None or kv_start.dtype == torch.int32
    group = num_q_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    depth = node_depths(tree_mask, num_nodes) if window is not None else prefix_len  # (unread without a window)

    block_d = max(16, triton.next_power_of_2(head_dim))
    rows = group * num_nodes
    programs_at_64 = triton.cdiv(rows, 64) * batch * num_kv_heads
    chosen_m, chosen_stages = _tile_config(q.device, q.dtype, rows, programs_at_64, block_d)
    block_m = block_m or chosen_m
    num_warps = num_warps or _warps_for(block_m, block_d)
    num_stages = num_stages or chosen_stages
    if block_n is None:
        wide = q.dtype == torch.float32 or block_d > 128
        block_n = 32 if wide else 64
    m_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = _choose_splits(q.device, m_blocks * batch * num_kv_heads, cache_len, block_n)
    dot_fp32, precision = dot_settings(q)

    if num_splits > 1:
        part_o = torch.empty(batch * num_q_heads * num_nodes, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch * num_q_heads * num_nodes, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    grid = (m_blocks, batch * num_kv_heads, num_splits)
    _tree_attention_kernel[grid](
        q, k, v, out, part_o, part_lse,
        prefix_len, kv_start if kv_start is not None else prefix_len, tree_mask, depth,
        num_nodes, num_kv_heads, group, head_dim, scale if softcap is not None else scale * LOG2E, num_splits,
        window if window is not None else 0, float(softcap) if softcap is not None else 1.0,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *tree_mask.stride(),
        HAS_KV_START=kv_start is not None,
        SPLIT_KV=num_splits > 1,
        WINDOW=window is not None,
        SOFTCAP=softcap is not None,
        DOT_PRECISION=precision,
        DOT_FP32=dot_fp32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _combine_kernel[(batch * num_q_heads * num_nodes,)](
            part_o, part_lse, out,
            num_q_heads, num_nodes, head_dim, num_splits,
            *out.stride(),
            SPLITS_P2=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=1 if block_d <= 64 else 2,
        )
    return out


def node_depths(tree_mask: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """int32 [B, T]: each node's depth, its ancestor count (the set bits of its mask row, itself
    excluded). On the device, without a host sync."""
    bits = torch.arange(32, device=tree_mask.device, dtype=torch.int32)
    set_bits = (tree_mask.unsqueeze(-1) >> bits) & 1  # [B, T, W, 32]
    columns = torch.arange(set_bits.shape[2] * 32, device=tree_mask.device).view(set_bits.shape[2], 32)
    ancestors = (set_bits * (columns < num_nodes)).sum(dim=(-1, -2))  # bits past T are no nodes
    return (ancestors - 1).to(torch.int32).contiguous()


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of T tree nodes over their prefix and their ancestors, in one pass.

    Parameters
    ----------
    q : [B, Hq, T, D] fp32/fp16/bf16 (any strides)
    k, v : [B, Hkv, S, D], same dtype; the tree's keys/values at rows [prefix_len[b], prefix_len[b] + T)
    prefix_len : int32 [B]
    tree_mask : int32 [B, T, ceil(T/32)], packed ancestor mask (little-endian bits)
    kv_start : int32 [B] or None (0): first visible cache row (left padding)
    scale : softmax scale, 1/sqrt(D) when None
    window : a sliding-window layer's window (module docstring), or None
    softcap : Gemma 2's logit soft-cap, or None

    Returns
    -------
    [B, Hq, T, D] in q's dtype; zeros for a query row that sees no row.
    """
    return _launch(q, k, v, prefix_len, tree_mask, kv_start, scale, window=window, softcap=softcap)
