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
    check_tensor("probs", probs, (torch.float32,), 2)
    check_tensor("uniforms", uniforms, (torch.float32,), 1)
    if probs.shape[1] == 0:
        raise ValueError("probs has an empty vocabulary")
    check_shape("uniforms", uniforms, (probs.shape[0],))
    check_same_device(probs=probs, uniforms=uniforms)
    if not capturing():
        check_distributions(probs)
        if not bool(((uniforms >= 0) & (uniforms < 1)).all()):
            raise ValueError("uniforms must lie in [0, 1)")
    return SAMPLE_TOKENS(probs, uniforms)


def check_distributions(probs: torch.Tensor) -> None:
    """Value checks (they read device memory back): bad numbers fail loudly, never hang or
    silently pick a token."""
    # Two passes over probs, not four: NaN or inf anywhere makes its row's sum non-finite.
    if float(probs.amin()) < 0:
        raise ValueError("probs holds negative values")
    sums = probs.sum(-1)
    if not bool(torch.isfinite(sums).all()):
        raise ValueError("probs holds NaN or inf (check the logits and the logits processors)")
    if not bool((sums > 0).all()):
        row = int((sums <= 0).nonzero()[0, 0])
        raise ValueError(f"probs row {row} has no mass: every token was filtered out")
