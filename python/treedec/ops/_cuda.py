"""Calls into treedec._cuda (CUDA kernels) for validated CUDA tensors.

Every launch goes to the current stream of the tensors' device; nothing here synchronises, so
the calls can be captured in a CUDA graph (compact_kv's device array of layer pointers is
built once per set of cache tensors and reused).
"""

from __future__ import annotations

import torch

from .. import _native


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def build_tree(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    module = _native.require_cuda()
    parents = parents.contiguous()
    batch, num_nodes = parents.shape
    depth = torch.empty(batch, num_nodes, dtype=torch.int32, device=parents.device)
    tree_mask = torch.empty(batch, num_nodes, (num_nodes + 31) // 32, dtype=torch.int32, device=parents.device)
    with torch.cuda.device(parents.device):
        module.build_tree(
            parents.data_ptr(), depth.data_ptr(), tree_mask.data_ptr(), batch, num_nodes, _stream(parents.device)
        )
    return depth, tree_mask


def verify_greedy(
    parents: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    module = _native.require_cuda()
    parents, tokens, target = parents.contiguous(), tokens.contiguous(), target.contiguous()
    batch, num_nodes = parents.shape
    device = parents.device
    accept_len = torch.empty(batch, dtype=torch.int32, device=device)
    accept_nodes = torch.empty(batch, num_nodes, dtype=torch.int32, device=device)
    bonus = torch.empty(batch, dtype=torch.int64, device=device)
    with torch.cuda.device(device):
        module.verify_greedy(
            parents.data_ptr(), tokens.data_ptr(), target.data_ptr(),
            accept_len.data_ptr(), accept_nodes.data_ptr(), bonus.data_ptr(), batch, num_nodes, _stream(device),
        )  # fmt: skip
    return accept_len, accept_nodes, bonus


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    module = _native.require_cuda()
    probs, uniforms = probs.contiguous(), uniforms.contiguous()
    rows, vocab = probs.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=probs.device)
    with torch.cuda.device(probs.device):
        module.sample_tokens(
            probs.data_ptr(), uniforms.data_ptr(), tokens.data_ptr(), rows, vocab, _stream(probs.device)
        )
    return tokens


# (device, data pointers) -> int64 device tensor of those pointers. Cache tensors are static
# buffers, so a decode loop sees one or two keys; the bound keeps stale entries from piling up.
_POINTER_ARRAYS: dict[tuple, torch.Tensor] = {}
_MAX_POINTER_ARRAYS = 64


def _pointer_array(tensors: list[torch.Tensor]) -> torch.Tensor:
    key = (tensors[0].device, tuple(t.data_ptr() for t in tensors))
    array = _POINTER_ARRAYS.get(key)
    if array is None:
        if len(_POINTER_ARRAYS) >= _MAX_POINTER_ARRAYS:
            _POINTER_ARRAYS.clear()
        array = torch.tensor(list(key[1]), dtype=torch.int64).to(tensors[0].device)
        _POINTER_ARRAYS[key] = array
    return array


def compact_kv(caches: list[torch.Tensor], prefix_len: torch.Tensor, accept_nodes: torch.Tensor) -> None:
    """One launch per group of tensors sharing (H, D, element size), one launch for a uniform model;
    every tensor is contiguous (the registry sends others to the reference)."""
    module = _native.require_cuda()
    prefix_len, accept_nodes = prefix_len.contiguous(), accept_nodes.contiguous()
    batch, num_nodes = accept_nodes.shape
    groups: dict[tuple[int, int, int], list[torch.Tensor]] = {}
    for cache in caches:
        groups.setdefault((cache.shape[1], cache.shape[3], cache.element_size()), []).append(cache)
    device = accept_nodes.device
    with torch.cuda.device(device):
        for (heads, head_dim, elem_size), tensors in groups.items():
            pointers = _pointer_array(tensors)
            module.compact_kv(
                pointers.data_ptr(), len(tensors), prefix_len.data_ptr(), accept_nodes.data_ptr(),
                batch, heads, tensors[0].shape[2], head_dim, elem_size, num_nodes, _stream(device),
            )  # fmt: skip
