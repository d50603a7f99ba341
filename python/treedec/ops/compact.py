import torch

from .. import reference
from . import _cpp, _cuda
from ._checks import capturing, check_same_device, check_tensor
from .registry import Op, Rule


def _strided_rows(caches, prefix_len, accept_nodes) -> str | None:
    return "a cache's rows are strided (the kernel copies whole rows)" if _cpp.rows_not_contiguous(caches) else None


def _not_contiguous(caches, prefix_len, accept_nodes) -> str | None:
    return "a cache tensor is not contiguous" if not all(c.is_contiguous() for c in caches) else None


COMPACT_KV = Op("compact_kv", "(Tensor(a!)[] caches, Tensor prefix_len, Tensor accept_nodes, str backend) -> ()",
                reference.compact_kv, lambda caches, prefix_len, accept_nodes: None, mutates=("caches",),
                declines={"cpp": [Rule("caches with strided rows", _strided_rows)],
                          "cuda": [Rule("caches that are not contiguous", _not_contiguous)]},
                cpp=_cpp.compact_kv, cuda=_cuda.compact_kv)


def compact_kv(caches: list[torch.Tensor], prefix_len: torch.Tensor, accept_nodes: torch.Tensor) -> None:
    """Move every sequence's accepted tree rows next to its prefix, in all layers at once (in place).

    Parameters
    ----------
    caches : list of [B, H, S, D] tensors
        All layers' keys and values; same B and S, any dtype.
    prefix_len : int32 [B]
        Rows already committed per sequence; tree node j sits at row prefix_len[b] + j.
    accept_nodes : int32 [B, T]
        Accepted path from `verify_greedy` (increasing, accept_nodes[b, j] >= j, -1 padded).
        Row prefix_len[b] + accept_nodes[b, j] moves to row prefix_len[b] + j.
    """
    if not isinstance(caches, (list, tuple)) or not caches:
        raise ValueError("caches must be a non-empty list of [B, H, S, D] tensors")
    check_tensor("prefix_len", prefix_len, (torch.int32,), 1)
    check_tensor("accept_nodes", accept_nodes, (torch.int32,), 2)
    batch, num_nodes = accept_nodes.shape
    if prefix_len.shape[0] != batch:
        raise ValueError(f"prefix_len has {prefix_len.shape[0]} entries; accept_nodes has {batch} rows")
    device = accept_nodes.device
    for layer, cache in enumerate(caches):
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4 or cache.shape[0] != batch:
            shape = tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache).__name__
            raise ValueError(f"caches[{layer}] has shape {shape}; expected [{batch}, H, S, D]")
        if cache.shape[2] != caches[0].shape[2]:
            raise ValueError(f"caches[{layer}] has {cache.shape[2]} rows; caches[0] has {caches[0].shape[2]}")
        if cache.device != device or prefix_len.device != device:  # the full check only to word the error
            check_same_device(cache=cache, prefix_len=prefix_len, accept_nodes=accept_nodes)
    capacity = caches[0].shape[2]
    if not capturing():
        _check_rows(prefix_len, accept_nodes, capacity)
    COMPACT_KV(list(caches), prefix_len, accept_nodes, device=accept_nodes.device)


def _check_rows(prefix_len: torch.Tensor, accept_nodes: torch.Tensor, capacity: int) -> None:
    """Value checks (they read device memory): the tree fits and accept_nodes is a root path."""
    num_nodes = accept_nodes.shape[1]
    if int(prefix_len.min()) < 0 or int(prefix_len.max()) + num_nodes > capacity:
        raise ValueError(
            f"prefix_len must lie in [0, {capacity - num_nodes}] so T={num_nodes} tree rows fit in "
            f"{capacity} cache rows; got [{int(prefix_len.min())}, {int(prefix_len.max())}]"
        )
    j = torch.arange(num_nodes, device=accept_nodes.device)
    valid = accept_nodes >= 0
    if bool(((accept_nodes < j) & valid).any()) or bool((accept_nodes >= num_nodes).any()):
        raise ValueError(f"accept_nodes must satisfy j <= accept_nodes[b, j] < {num_nodes} (a root path)")
