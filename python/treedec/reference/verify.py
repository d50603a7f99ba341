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


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling, one token per row: probs float32 [N, V] (non-negative, positive sum,
    need not be normalised), uniforms float32 [N] in [0, 1) -> int64 [N].

    Row n gives the first index whose running float64 sum exceeds uniforms[n] * sum(row); if
    rounding runs past the end, the last index with positive weight.
    """
    weights = probs.double()
    running = weights.cumsum(-1)
    threshold = uniforms.double() * running[:, -1]
    above = running > threshold[:, None]
    first = above.int().argmax(-1)
    vocab = weights.shape[-1]
    last_positive = vocab - 1 - (weights.flip(-1) > 0).int().argmax(-1)
    return torch.where(above.any(-1), first, last_positive).long()


def verify_sample(
    parents: torch.Tensor, tokens: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless verification by sampling.

    parents int32 [B, T], tokens int64 [B, T] (-1 = padding node), probs float32 [B, T, V] (the
    processed target distribution after each node), uniforms float32 [B, T] in [0, 1): node i's
    draw, which callers make the uniform of the output position after node i (nodes of one depth
    share it).

    Each node's target is sampled by inverse CDF, target[b, i] = sample_tokens(probs[b, i],
    uniforms[b, i]); then greedy verification against those targets. This is recursive rejection
    over the children with common random numbers: child c (token x) is accepted iff the node's
    uniform falls in x's interval of the CDF, which, given that the children tried before were
    rejected, has exactly the probability of x under the residual distribution with those
    children removed and renormalised; and when every child is rejected, the bonus (the target)
    is distributed as that residual. So every emitted token has exactly the target distribution,
    and, because a position's token depends only on its uniform and its context, the output does
    not depend on the draft tree at all: it equals token-by-token inverse-CDF sampling with the
    same uniforms.
    """
    batch, num_nodes, vocab = probs.shape
    target = sample_tokens(probs.reshape(-1, vocab), uniforms.reshape(-1)).view(batch, num_nodes)
    return verify_greedy(parents, tokens, target.to(tokens.device))
