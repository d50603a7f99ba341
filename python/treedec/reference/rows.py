import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, ...], index int64 [A] -> x[index], a dense [A, ...] block."""
    return x.index_select(0, index)


def scatter_rows(x: torch.Tensor, index: torch.Tensor, block: torch.Tensor) -> None:
    """In place: x[index[i]] = block[i] (indices distinct)."""
    x.index_copy_(0, index, block)
