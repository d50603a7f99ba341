"""Reference: depth and packed ancestor mask of a batch of trees."""

import torch


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., N] -> int32 [..., ceil(N/32)], bit j of word w is element 32*w + j (little-endian)."""
    n = bits.shape[-1]
    words = (n + 31) // 32
    padded = torch.zeros(*bits.shape[:-1], words * 32, dtype=torch.int64, device=bits.device)
    padded[..., :n] = bits.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=bits.device) << torch.arange(32, device=bits.device)
    packed = (padded.view(*bits.shape[:-1], words, 32) * weights).sum(-1)
    # Reinterpret the low 32 bits as a signed int32 (bit 31 set -> negative).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def chain_tree_mask(batch: int, num_nodes: int) -> torch.Tensor:
    """Packed ancestor mask of a chain (a causal block) without walking the tree: int32 [B, T, W]."""
    index = torch.arange(num_nodes)
    return pack_bits(index.view(1, -1) <= index.view(-1, 1)).expand(batch, -1, -1).contiguous()


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., W] -> bool [..., n]; the inverse of `pack_bits`."""
    shifts = torch.arange(32, device=packed.device, dtype=torch.int64)
    bits = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1  # [..., W, 32]
    return bits.flatten(-2)[..., :n].bool()


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """parents int [B, T] -> bool [B, T, T]; [b, i, j] iff node j is node i or an ancestor of it."""
    batch, num_nodes = parents.shape
    eye = torch.eye(num_nodes, dtype=torch.bool, device=parents.device)
    anc = eye.expand(batch, num_nodes, num_nodes).clone()
    rows = torch.arange(batch, device=parents.device)
    for i in range(1, num_nodes):  # topological order: a parent's row is final before its children read it
        anc[:, i] |= anc[rows, parents[:, i].long()]
    return anc


def build_tree(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """parents int32 [B, T] -> (depth int32 [B, T], tree_mask int32 [B, T, ceil(T/32)])."""
    anc = ancestor_matrix(parents)
    depth = anc.sum(-1, dtype=torch.int32) - 1  # ancestors counted without the node itself
    return depth, pack_bits(anc)
