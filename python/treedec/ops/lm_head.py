import torch

from . import _library
from ._backend import choose_backend
from ._checks import check_projection

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lm_head_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the LM-head logits without the caller handling [N, V] logits.

    Parameters
    ----------
    hidden : [N, H]
    weight : [V, H]
        The LM head's weight (same dtype as hidden).
    k : int
        1 <= k <= V. k == 1 is greedy's argmax (ties go to the smallest id).

    Returns
    -------
    values : float32 [N, k], largest first
    indices : int64 [N, k]
    """
    check_projection("hidden", hidden, weight, FLOAT_DTYPES)
    if not isinstance(k, int) or not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k = {k!r} must be an int in [1, {weight.shape[0]}]")
    backend = choose_backend(hidden.device, "lm_head_topk")
    if _library.compiling():
        return torch.ops.treedec.lm_head_topk(hidden, weight, k, backend)
    return _library.implementation("lm_head_topk", backend)(hidden, weight, k)
