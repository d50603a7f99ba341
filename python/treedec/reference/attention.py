"""Reference: tree attention as SDPA with a dense boolean mask, and with a sliding window and a
logit soft-cap (eager attention's order for the soft-cap, which SDPA lacks)."""

import torch
import torch.nn.functional as F

from .tree import unpack_bits


def dense_tree_mask(
    prefix_len: torch.Tensor, tree_mask: torch.Tensor, kv_start: torch.Tensor | None, num_nodes: int, kv_len: int,
    window: int | None = None,
) -> torch.Tensor:
    """bool [B, 1, T, kv_len]: query node i of sequence b may read cache row r.

    r is visible iff r >= kv_start[b] and either r < prefix_len[b] (the prefix) or r is tree row
    prefix_len[b] + j with bit j set in tree_mask[b, i]. A row that sees nothing (a left-padding
    row during prefill, where kv_start > prefix_len) is opened to every row so it stays finite;
    its output is never used.

    `window` (a sliding-window layer): a node also sees only the rows fewer than `window`
    positions behind it, as transformers' sliding mask (kv_idx > q_idx - window). Positions
    follow the rows' order, so a prefix row r sits at r and a node of depth d (its ancestor count,
    itself excluded) at prefix_len[b] + d: the window applies per node by its depth, not its index.
    """
    device = tree_mask.device
    batch = tree_mask.shape[0]
    if kv_start is None:
        kv_start = torch.zeros(batch, dtype=torch.int32, device=device)
    rows = torch.arange(kv_len, device=device)
    prefix = prefix_len.long().view(batch, 1)
    in_prefix = (rows >= kv_start.long().view(batch, 1)) & (rows < prefix)  # [B, S]
    ancestors = unpack_bits(tree_mask, num_nodes)  # [B, T, T]
    offset = rows.view(1, kv_len) - prefix  # [B, S]: tree node index of row r, if in range
    in_tree = (offset >= 0) & (offset < num_nodes) & (rows >= kv_start.long().view(batch, 1))
    node = offset.clamp(0, num_nodes - 1)
    tree_visible = torch.gather(ancestors, 2, node.unsqueeze(1).expand(batch, num_nodes, kv_len))
    mask = in_prefix.unsqueeze(1) | (in_tree.unsqueeze(1) & tree_visible)  # [B, T, S]
    if window is not None:
        if window < 1:
            raise ValueError(f"window = {window} must be at least 1")
        depth = ancestors.sum(-1) - 1  # [B, T]
        query_at = prefix + depth  # [B, T]
        key_at = torch.where(in_tree, prefix + torch.gather(depth, 1, node), rows.view(1, kv_len))  # [B, S]
        mask &= query_at.unsqueeze(2) - key_at.unsqueeze(1) < window
    mask |= ~mask.any(-1, keepdim=True)
    return mask.unsqueeze(1)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    scale: float | None = None,
    dense_mask: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    unmasked: bool | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] -> [B, Hq, T, D]. GQA when Hq is a multiple of Hkv.

    `dense_mask` (from `dense_tree_mask`) may be passed in so a caller running many layers
    builds it once per step; it must match the other arguments, `window` included (see
    `dense_tree_mask`); its width is then the rows read (max(prefix_len) + T), and `unmasked`
    may say whether it is all true, `causal` that it is plain causal attention of the T nodes
    over themselves (a chain on an empty cache: SDPA's causal kernel skips the masked half).
    They spare a read of device memory per call. `softcap`
    (Gemma 2): scores become softcap * tanh(scores / softcap) before the mask, as transformers'
    eager attention does.
    """
    num_nodes = q.shape[2]
    kv_len = dense_mask.shape[-1] if dense_mask is not None else int(prefix_len.max()) + num_nodes
    k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    if dense_mask is None:
        dense_mask = dense_tree_mask(prefix_len, tree_mask, kv_start, num_nodes, kv_len, window)
    if softcap is not None:
        return softcapped_attention(q, k, v, dense_mask, scale, softcap)
    if causal:
        if kv_len != num_nodes:
            raise ValueError(f"causal attention of {num_nodes} nodes over {kv_len} rows: a causal step reads "
                             "only its own rows (an empty cache)")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    # Nothing masked (one node, no padding: a plain decode step): SDPA's unmasked kernel is faster.
    if unmasked is None:
        unmasked = bool(dense_mask.all())
    attn_mask = None if unmasked else dense_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def softcapped_attention(q, k, v, mask, scale: float | None, softcap: float) -> torch.Tensor:
    """Attention with soft-capped scores, in transformers' eager order: scale, cap, mask, an fp32
    softmax, cast back, then the values."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)
