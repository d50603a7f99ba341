"""Reference: move each sequence's accepted tree rows next to its prefix, in every layer."""

import torch


def compact_kv(caches: list[torch.Tensor], prefix_len: torch.Tensor, accept_nodes: torch.Tensor) -> None:
    """In place. caches: tensors [B, H, S, D]; prefix_len int32 [B]; accept_nodes int32 [B, T].

    Row prefix_len[b] + accept_nodes[b, j] moves to row prefix_len[b] + j for every j with
    accept_nodes[b, j] >= 0. prefix_len itself is not changed here.
    """
    for b in range(accept_nodes.shape[0]):
        path = accept_nodes[b][accept_nodes[b] >= 0].long()
        base = int(prefix_len[b])
        src = base + path
        dst = base + torch.arange(path.numel(), device=path.device)
        for cache in caches:
            cache[b, :, dst] = cache[b, :, src]  # advanced indexing gathers before it writes
