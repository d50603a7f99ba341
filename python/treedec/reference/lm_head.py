"""Reference: LM-head projection followed by top-k."""

import torch


def lm_head_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H] -> (values [N, k], indices int64 [N, k]), largest first.

    Logits are computed in float32 whatever the input dtype, as HF's greedy search compares them.
    """
    logits = (hidden @ weight.T).float()
    if k == 1:  # argmax's tie rule (first index), the one HF greedy uses
        indices = logits.argmax(dim=-1, keepdim=True)
        return logits.gather(-1, indices), indices
    return torch.topk(logits, k, dim=-1)
