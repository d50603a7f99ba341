import torch

from . import _library
from ._checks import check_projection, check_same_device, check_tensor
from .lm_head import lm_head_backend

HEAD_DTYPES = (torch.float32, torch.bfloat16)


def draft_heads_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend `draft_heads_topk` runs for `dtype` on `device`: fp32 on a GPU goes where
    `lm_head_topk` sends it under TREEDEC_BACKEND=auto (torch), since the LM-head pass, which
    dominates, is that op's kernel and its fp32 path lost to cuBLAS + topk on an H100."""
    return lm_head_backend(device, dtype, op="draft_heads_topk")


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
    streaming `lm_head_topk` pass over the vocabulary (C++). On CUDA (bf16; fp32 runs torch, see
    `draft_heads_backend`) one Triton launch per block layer runs that block of every head (fp32
    accumulation), then the Triton `lm_head_topk` streams the vocabulary for all N*K states (k > 16
    falls back to logits + torch.topk for that pass). Elsewhere torch (the reference).
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
    backend = draft_heads_backend(hidden.device, hidden.dtype)
    if _library.compiling():
        return torch.ops.treedec.draft_heads_topk(hidden, weights, biases, lm_weight, k, backend)
    return _library.implementation("draft_heads_topk", backend)(hidden, weights, biases, lm_weight, k)
