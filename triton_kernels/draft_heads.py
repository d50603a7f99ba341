"""Draft heads' residual blocks, all K heads in one launch per block layer.

Head j runs L blocks x <- x + SiLU(W[j, l] @ x + b[j, l]) from x = hidden (Medusa/Hydra heads).
`_head_block_kernel` runs block l of every head at once: one program per (tile of BLOCK_R rows,
tile of BLOCK_O output columns, head). It accumulates x @ W.T over the input width in BLOCK_I
steps with tl.dot in fp32, adds the bias, applies SiLU and adds the residual in fp32, and rounds to
the input dtype once per block (the reference rounds after the matmul, the SiLU and the add).
Block l+1 reads every column of block l's output, so each layer is its own launch; layers write
to alternating buffers, never to the buffer they read.

The LM-head top-k of the resulting states is `lm_head_topk.lm_head_topk` on the [N*K, H] view
(treedec.ops composes the two).
"""

import torch
import triton
import triton.language as tl

from ._launch import dot_settings, row_block


# The row count changes with every tree size: not specialising on it keeps one compiled kernel
# per (dtype, BLOCK_R).
@triton.jit(do_not_specialize=["num_rows"])
def _head_block_kernel(
    x_ptr,  # [N, K, H] (stride_xk = 0 for the first block: every head reads hidden [N, H])
    weight_ptr,  # [K, H, H] (out, in): this block's weights of every head
    bias_ptr,  # [K, H]
    out_ptr,  # [N, K, H]
    num_rows,  # N
    width,  # H
    stride_xn, stride_xk, stride_xh,
    stride_wk, stride_wo, stride_wi,
    stride_bk, stride_bh,
    stride_on, stride_ok, stride_oh,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast tiles before tl.dot (CPU interpreter: its 16-bit dot is wrong)
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # Row tiles vary fastest: the programs that read one weight tile run together (L2 reuse).
    pid_r = tl.program_id(0)
    pid_o = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    rows64 = rows.to(tl.int64)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    out_valid = outs < width
    inputs = tl.arange(0, BLOCK_I)
    x_base = x_ptr + head * stride_xk + rows64[:, None] * stride_xn  # [BLOCK_R, 1]
    w_base = weight_ptr + head * stride_wk + outs.to(tl.int64)[None, :] * stride_wo  # [1, BLOCK_O]

    acc = tl.zeros([BLOCK_R, BLOCK_O], dtype=tl.float32)
    for i0 in range(0, width, BLOCK_I):
        i = i0 + inputs
        i_valid = i < width
        x = tl.load(x_base + i[None, :] * stride_xh, mask=row_valid[:, None] & i_valid[None, :], other=0.0)
        wt = tl.load(w_base + i[:, None] * stride_wi, mask=i_valid[:, None] & out_valid[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=DOT_PRECISION)  # [BLOCK_R, BLOCK_O] += x @ W.T

    bias = tl.load(bias_ptr + head * stride_bk + outs * stride_bh, mask=out_valid, other=0.0).to(tl.float32)
    pre = acc + bias[None, :]
    valid = row_valid[:, None] & out_valid[None, :]
    residual = tl.load(x_base + outs[None, :] * stride_xh, mask=valid, other=0.0).to(tl.float32)
    result = residual + pre * tl.sigmoid(pre)
    out = out_ptr + rows64[:, None] * stride_on + head * stride_ok + outs[None, :] * stride_oh
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=valid)


def _launch(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    biases: torch.Tensor,
    block_o: int = 64,
    block_i: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """Defaults from a sweep on an H100 (K=4, H=4096, bf16, N=1/8/64): 60-61 us per layer, about
    2.2 TB/s of head weights; 64x64 tiles with 4 warps took 64-66 us, BLOCK_I=256 up to 156 us
    (bench/results/h100/draft_heads_sweeps.log)."""
    num_rows, width = hidden.shape
    heads, blocks = weights.shape[:2]
    assert weights.shape[2:] == (width, width) and biases.shape == (heads, blocks, width)
    assert weights.dtype == hidden.dtype and biases.dtype == hidden.dtype
    states = torch.empty(num_rows, heads, width, dtype=hidden.dtype, device=hidden.device)
    if num_rows == 0 or heads == 0:
        return states
    if blocks == 0:
        states.copy_(hidden[:, None, :])
        return states

    block_r = row_block(num_rows)
    block_i = min(block_i, max(16, triton.next_power_of_2(width)))
    block_o = min(block_o, max(16, triton.next_power_of_2(width)))
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(width, block_o), heads)
    dot_fp32, precision = dot_settings(hidden)

    # Block l writes `states` when L-1-l is even, so the last block lands there; the others write
    # `scratch`. No block writes the buffer it reads.
    scratch = torch.empty_like(states) if blocks > 1 else None
    x, x_strides = hidden, (hidden.stride(0), 0, hidden.stride(1))
    for block in range(blocks):
        out = states if (blocks - 1 - block) % 2 == 0 else scratch
        weight, bias = weights[:, block], biases[:, block]  # [K, H, H], [K, H] views
        _head_block_kernel[grid](
            x, weight, bias, out,
            num_rows, width,
            *x_strides, *weight.stride(), *bias.stride(), *out.stride(),
            DOT_PRECISION=precision,
            DOT_FP32=dot_fp32,
            BLOCK_R=block_r,
            BLOCK_O=block_o,
            BLOCK_I=block_i,
            num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip
        x, x_strides = out, out.stride()
    return states


def head_states(hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """Every draft head's residual SiLU blocks (treedec.reference.heads.head_states, fused per layer).

    Parameters
    ----------
    hidden : [N, H] fp32/fp16/bf16 (any strides)
    weights : [K, L, H, H] (head, block, out, in), biases : [K, L, H]; hidden's dtype, any strides

    Returns
    -------
    states : [N, K, H] contiguous, hidden's dtype: head j's x after its L blocks (fp32 inside a
    block, rounded to the dtype after each)
    """
    return _launch(hidden, weights, biases)
