"""Row gather / scatter: layer-skip batching's data movement.

When the rows of a batch run different layers (different skip sets or exit layers per sequence),
each layer runs on a dense block of the rows that need it: `gather_rows` builds the block,
the layer runs on it, `scatter_rows` writes its output back. Rows that skip the layer keep their
hidden state (a skipped layer adds nothing to the residual stream).
"""

import torch

from .. import reference
from . import _cpp, _triton
from ._checks import capturing, check_same_device, check_tensor
from .registry import Op, Rule


def _strided(x, *rest) -> str | None:
    return "x's rows are not contiguous (a strided view)" if x.shape[0] and not x[0].is_contiguous() else None


GATHER_ROWS = Op("gather_rows", "(Tensor x, Tensor index, str backend) -> Tensor", reference.gather_rows,
                 lambda x, index: x.new_empty((index.shape[0], *x.shape[1:])),
                 declines={"cpp": [Rule("strided rows", _strided)], "triton": [Rule("strided rows", _strided)]},
                 cpp=_cpp.gather_rows, triton=_triton.gather_rows)
SCATTER_ROWS = Op("scatter_rows", "(Tensor(a!) x, Tensor index, Tensor block, str backend) -> ()",
                  reference.scatter_rows, lambda x, index, block: None, mutates=("x",),
                  cpp=_cpp.scatter_rows, triton=_triton.scatter_rows)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows `index` of `x` as one dense block.

    Parameters
    ----------
    x : [B, ...] any dtype
    index : int64 [A], each in [0, B) (repeats allowed)

    Returns
    -------
    [A, ...] contiguous, x's dtype: row i is x[index[i]].
    """
    _check(x, index)
    if not capturing():
        _check_values(index, x.shape[0], unique=False)
    return GATHER_ROWS(x, index)


def scatter_rows(x: torch.Tensor, index: torch.Tensor, block: torch.Tensor) -> None:
    """Write `block`'s rows back into `x` at rows `index`, in place.

    Parameters
    ----------
    x : [B, ...] contiguous
    index : int64 [A], distinct, each in [0, B)
    block : [A, ...] x's dtype and trailing shape

    x[index[i]] becomes block[i]; the other rows of x are untouched.
    """
    _check(x, index)
    if not isinstance(block, torch.Tensor):
        raise TypeError(f"block must be a torch.Tensor, got {type(block).__name__}")
    check_same_device(x=x, index=index, block=block)
    if block.dtype != x.dtype:
        raise ValueError(f"block is {block.dtype} but x is {x.dtype}")
    if tuple(block.shape) != (index.shape[0], *x.shape[1:]):
        raise ValueError(f"block has shape {tuple(block.shape)}; expected {(index.shape[0], *x.shape[1:])}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (it is written in place)")
    if not capturing():
        _check_values(index, x.shape[0], unique=True)
    SCATTER_ROWS(x, index, block)


def _check(x: torch.Tensor, index: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have a leading batch dimension")
    check_tensor("index", index, (torch.int64,), 1)
    check_same_device(x=x, index=index)


def _check_values(index: torch.Tensor, batch: int, unique: bool) -> None:
    """Value checks (they read device memory): indices in range and, for a scatter, distinct."""
    if index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= batch:
        raise ValueError(f"index must lie in [0, {batch}); got [{low}, {high}]")
    if unique and index.unique().numel() != index.numel():
        raise ValueError("scatter_rows needs distinct indices (a repeated row's result would depend on order)")
