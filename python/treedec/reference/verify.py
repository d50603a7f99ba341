"""Reference: greedy verification of a batch of draft trees."""

import torch


def verify_greedy(
    parents: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Longest accepted root path per sequence.

    parents int32 [B, T], tokens int64 [B, T] (-1 = padding node), target int64 [B, T]
    (the model's argmax after each node). Returns accept_len int32 [B] (draft nodes accepted,
    root excluded), accept_nodes int32 [B, T] (root path, -1 padded), bonus int64 [B].
    """
    batch, num_nodes = parents.shape
    rows = torch.arange(batch, device=parents.device)
    accepted = torch.zeros(batch, num_nodes, dtype=torch.bool, device=parents.device)
    depth = torch.zeros(batch, num_nodes, dtype=torch.int64, device=parents.device)
    accepted[:, 0] = True
    for i in range(1, num_nodes):
        parent = parents[:, i].long()
        accepted[:, i] = accepted[rows, parent] & (tokens[:, i] >= 0) & (tokens[:, i] == target[rows, parent])
        depth[:, i] = depth[rows, parent] + 1
    score = torch.where(accepted, depth, torch.full_like(depth, -1))
    deepest = score.argmax(dim=1)  # first maximum: ties go to the smallest node index
    accept_len = depth[rows, deepest]

    accept_nodes = torch.full((batch, num_nodes), -1, dtype=torch.int32, device=parents.device)
    for b in range(batch):
        node = int(deepest[b])
        for j in range(int(accept_len[b]), -1, -1):
            accept_nodes[b, j] = node
            node = int(parents[b, node])
    bonus = target[rows, deepest]
    return accept_len.to(torch.int32), accept_nodes, bonus
