"""Reference: LM-head projection followed by top-k."""

import torch


def lm_head_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H] -> (values [N, k], indices int64 [N, k]), largest first.

    Logits are computed in float32 whatever the input dtype, as HF's greedy search compares them.
    """
    return topk_of_logits((hidden @ weight.T).float(), k)


def topk_of_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (values [..., k], indices int64 [..., k]), largest first. The first id
    breaks ties as argmax does (the smallest index), the rule HF greedy uses; torch.topk may put
    another of the tied ids first."""
    first = logits.argmax(dim=-1, keepdim=True)
    if k == 1:
        return logits.gather(-1, first), first
    values, indices = torch.topk(logits, k, dim=-1)
    indices = torch.where(indices == first, indices[..., :1], indices)  # argmax's id, if listed, swaps places
    indices[..., :1] = first
    return values, indices
