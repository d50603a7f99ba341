import torch

from .. import reference
from . import _cpp, _cuda
from ._checks import capturing, check_same_device, check_shape, check_tensor
from .registry import Op

SAMPLE_TOKENS = Op("sample_tokens", "(Tensor probs, Tensor uniforms, str backend) -> Tensor", reference.sample_tokens,
                   lambda probs, uniforms: probs.new_empty(probs.shape[0], dtype=torch.int64),
                   cpp=_cpp.sample_tokens, cuda=_cuda.sample_tokens)


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row.

    Parameters
    ----------
    probs : float32 [N, V]
        Non-negative weights with a positive, finite sum per row (need not be normalised).
    uniforms : float32 [N]
        U[0, 1) draws.

    Returns
    -------
    int64 [N]: the first index whose running float64 sum exceeds uniforms[n] * sum(row)
    (the last index with positive weight if rounding runs past the end). Given its uniform, a
    row's token is a fixed function of the row: this is what makes tree sampling reproducible.
    """
    tokens, found = sample_tokens_deferred(probs, uniforms)
    if found is not None:
        raise_faults(found.tolist())
    return tokens


def sample_tokens_deferred(probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sample_tokens` without reading device memory back: the tokens, and the value checks'
    verdict as a device tensor (`faults`; None while a CUDA graph captures) that the caller reads
    with the step's other results, in one host transfer, and hands to `raise_faults` before it
    uses the tokens. The decode loop samples this way so that a GPU step waits for the device
    once, not once per check."""
    check_tensor("probs", probs, (torch.float32,), 2)
    check_tensor("uniforms", uniforms, (torch.float32,), 1)
    if probs.shape[1] == 0:
        raise ValueError("probs has an empty vocabulary")
    check_shape("uniforms", uniforms, (probs.shape[0],))
    check_same_device(probs=probs, uniforms=uniforms)
    return SAMPLE_TOKENS(probs, uniforms), None if capturing() else faults(probs, uniforms)


def faults(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """int64 [4] on probs' device: whether probs holds a negative value, whether a row's sum is
    NaN or inf (NaN or inf anywhere in the row makes it so), the first row without mass (-1:
    none), whether a uniform lies outside [0, 1). Computed on the device, read by the caller."""
    sums = probs.sum(-1)
    empty = sums <= 0
    first_empty = torch.where(empty.any(), empty.to(torch.int64).argmax(), -1)
    outside = ~((uniforms >= 0) & (uniforms < 1)).all()
    verdicts = [probs.amin() < 0, ~torch.isfinite(sums).all(), first_empty, outside]
    return torch.stack([v.to(torch.int64) for v in verdicts])


def raise_faults(found: list[int]) -> None:
    """The ValueError for the first fault `faults` found (read to the host), in check order:
    bad numbers fail loudly, never hang or silently pick a token."""
    negative, not_finite, empty_row, outside = found
    if negative:
        raise ValueError("probs holds negative values")
    if not_finite:
        raise ValueError("probs holds NaN or inf (check the logits and the logits processors)")
    if empty_row >= 0:
        raise ValueError(f"probs row {empty_row} has no mass: every token was filtered out")
    if outside:
        raise ValueError("uniforms must lie in [0, 1)")
