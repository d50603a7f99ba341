"""Reference: draft heads' residual blocks, then the LM head's top-k per head."""

import torch

from .lm_head import lm_head_topk


def draft_heads_topk(hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, lm_weight: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H]; weights [K, L, H, H], biases [K, L, H]: head j's L blocks x <- x + SiLU(W x + b);
    lm_weight [V, H] -> values float32 [N, K, k], ids int64 [N, K, k], states [N, K, H]."""
    rows, heads = hidden.shape[0], weights.shape[0]
    states = []
    for head in range(heads):
        x = hidden
        for block in range(weights.shape[1]):
            x = x + torch.nn.functional.silu(torch.nn.functional.linear(x, weights[head, block], biases[head, block]))
        states.append(x)
    states = torch.stack(states, dim=1)
    values, ids = lm_head_topk(states.reshape(rows * heads, -1), lm_weight, k)
    return values.view(rows, heads, k), ids.view(rows, heads, k), states
