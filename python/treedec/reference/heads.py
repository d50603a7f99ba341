"""Reference: draft heads' residual blocks, then the LM head's top-k per head."""

import torch

from .lm_head import lm_head_topk


def head_states(hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor,
                linear=torch.nn.functional.linear) -> torch.Tensor:
    """hidden [N, H]; weights [K, L, H, H], biases [K, L, H] -> [N, K, H]: head j runs its L blocks
    x <- x + SiLU(linear(x, W, b)) from x = hidden. `linear` lets a backend bring its own matmul."""
    states = []
    for head in range(weights.shape[0]):
        x = hidden
        for block in range(weights.shape[1]):
            x = x + torch.nn.functional.silu(linear(x, weights[head, block], biases[head, block]))
        states.append(x)
    return torch.stack(states, dim=1)


def draft_heads_topk(hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, lm_weight: torch.Tensor,
                     k: int, linear=torch.nn.functional.linear,
                     topk=lm_head_topk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H]; weights [K, L, H, H], biases [K, L, H] (see `head_states`); lm_weight [V, H]
    -> values float32 [N, K, k], ids int64 [N, K, k], states [N, K, H]. `linear` and `topk` are
    torch's here; the C++ backend passes its kernels."""
    rows, heads = hidden.shape[0], weights.shape[0]
    states = head_states(hidden, weights, biases, linear)
    values, ids = topk(states.reshape(rows * heads, -1).contiguous(), lm_weight, k)
    return values.view(rows, heads, k), ids.view(rows, heads, k), states
