import torch

from .. import reference
from . import _cpp, _triton
from ._checks import check_projection, check_same_device, check_tensor
from .lm_head import FP32_ON_GPU, k_past_triton_limit
from .registry import Op, Rule

HEAD_DTYPES = (torch.float32, torch.bfloat16)


def _k_past_triton_limit(hidden, weights, biases, lm_weight, k) -> str | None:
    return k_past_triton_limit(hidden, lm_weight, k)


def _fake(hidden, weights, biases, lm_weight, k):
    rows, heads, width = hidden.shape[0], weights.shape[0], hidden.shape[1]
    return (hidden.new_empty(rows, heads, k, dtype=torch.float32), hidden.new_empty(rows, heads, k, dtype=torch.int64),
            hidden.new_empty(rows, heads, width))


# The LM-head pass, which dominates, is lm_head_topk's kernel: its rules apply (fp32 on a GPU runs
# torch under auto, since that kernel's fp32 path lost to cuBLAS + topk on an H100).
DRAFT_HEADS_TOPK = Op(
    "draft_heads_topk",
    "(Tensor hidden, Tensor weights, Tensor biases, Tensor lm_weight, int k, str backend) -> (Tensor, Tensor, Tensor)",
    reference.draft_heads_topk, _fake,
    declines={"triton": [Rule(f"k > {_triton.LM_HEAD_MAX_K}", _k_past_triton_limit)]},
    avoids={"triton": [FP32_ON_GPU]},
    cpp=_cpp.draft_heads_topk, triton=_triton.draft_heads_topk,
)


def draft_heads_topk(hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, lm_weight: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every draft head's residual blocks, then the LM head's top-k for every head and row, without
    [N, K, V] logits.

    Parameters
    ----------
    hidden : [N, H] float32 or bfloat16 (the states the heads read)
    weights : [K, L, H, H], biases : [K, L, H], hidden's dtype
        head j runs its L blocks x <- x + SiLU(weights[j, l] @ x + biases[j, l]) from x = hidden
    lm_weight : [V, H], hidden's dtype (the base model's LM head)
    k : 1 <= k <= V

    Returns
    -------
    values float32 [N, K, k] (largest first), ids int64 [N, K, k], states [N, K, H] (each head's
    state: Hydra feeds it to the next depth)

    Backends: on the CPU the blocks run through `linear_rows` and all N*K states go through one
    streaming `lm_head_topk` pass over the vocabulary (C++). On CUDA (bf16; fp32 and k > 16 run
    torch, see DRAFT_HEADS_TOPK's rules) one Triton launch per block layer runs that block of every
    head (fp32 accumulation), then the Triton `lm_head_topk` streams the vocabulary for all N*K
    states. Elsewhere torch (the reference).
    """
    check_projection("hidden", hidden, lm_weight, HEAD_DTYPES)
    check_tensor("weights", weights, HEAD_DTYPES, 4)
    check_tensor("biases", biases, HEAD_DTYPES, 3)
    check_same_device(hidden=hidden, weights=weights, biases=biases, lm_weight=lm_weight)
    heads, blocks, width = weights.shape[0], weights.shape[1], hidden.shape[1]
    if weights.shape[2:] != (width, width):
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected [K, L, {width}, {width}]")
    if tuple(biases.shape) != (heads, blocks, width):
        raise ValueError(f"biases has shape {tuple(biases.shape)}; expected {(heads, blocks, width)}")
    if weights.dtype != hidden.dtype or biases.dtype != hidden.dtype:
        raise ValueError(f"weights and biases must be {hidden.dtype} like hidden")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= lm_weight.shape[0]:
        raise ValueError(f"k = {k!r} must be an int in [1, {lm_weight.shape[0]}]")
    return DRAFT_HEADS_TOPK(hidden, weights, biases, lm_weight, k)
