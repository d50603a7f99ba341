import torch

from .. import reference
from . import _cpp, _cuda
from ._checks import capturing, check_parents, check_same_device, check_shape, check_tensor
from .registry import Op
from .sample import sample_tokens


def _fake(parents, tokens, target):
    batch, num_nodes = parents.shape
    return (parents.new_empty(batch, dtype=torch.int32), parents.new_empty(batch, num_nodes, dtype=torch.int32),
            parents.new_empty(batch, dtype=torch.int64))


VERIFY_GREEDY = Op("verify_greedy", "(Tensor parents, Tensor tokens, Tensor target, str backend) -> (Tensor, Tensor, Tensor)",
                   reference.verify_greedy, _fake, cpp=_cpp.verify_greedy, cuda=_cuda.verify_greedy)


def verify_greedy(
    parents: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree verification: the deepest root path whose every token is the model's argmax.

    Parameters
    ----------
    parents : int32 [B, T]
        Tree structure (see `build_tree`).
    tokens : int64 [B, T]
        Draft token of each node; -1 marks a padding node, never accepted. tokens[:, 0] is the root.
    target : int64 [B, T]
        The model's argmax after each node.

    Returns
    -------
    accept_len : int32 [B]
        Accepted draft nodes, root excluded.
    accept_nodes : int32 [B, T]
        Node indices of the accepted path from the root (accept_nodes[:, 0] == 0), -1 padded.
    bonus : int64 [B]
        target at the deepest accepted node: the token emitted after the accepted ones.
        Among equally deep accepted nodes the smallest index wins.
    """
    check_tensor("parents", parents, (torch.int32,), 2)
    check_tensor("tokens", tokens, (torch.int64,), 2)
    check_tensor("target", target, (torch.int64,), 2)
    check_shape("tokens", tokens, parents.shape)
    check_shape("target", target, parents.shape)
    check_same_device(parents=parents, tokens=tokens, target=target)
    check_parents(parents)
    return VERIFY_GREEDY(parents, tokens, target)


def verify_sample(
    parents: torch.Tensor, tokens: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless verification by sampling (drafts are deterministic proposals).

    Parameters
    ----------
    parents : int32 [B, T]
        Tree structure (see `build_tree`).
    tokens : int64 [B, T]
        Draft token of each node, in [0, V); -1 marks a padding node, never accepted.
    probs : float32 [B, T, V]
        The target distribution after each node, logits processors applied (rows need not be
        normalised: each is used relative to its own sum, which must be positive and finite).
    uniforms : float32 [B, T]
        U[0, 1) draw of each node: the draw of the output position after the node (nodes of one
        depth share it). Passing them in keeps runs reproducible and the step graph-capturable.

    Returns
    -------
    accept_len : int32 [B], accept_nodes : int32 [B, T], bonus : int64 [B]
        As in `verify_greedy`, against each node's target token sampled from probs[b, i] by
        inverse CDF with uniforms[b, i]: recursive rejection over the children with common random
        numbers, so the emitted tokens are distributed exactly as sampling from `probs` token by
        token, whatever the tree. Rule and proof: `treedec.reference.verify_sample`.
    """
    check_tensor("parents", parents, (torch.int32,), 2)
    check_tensor("tokens", tokens, (torch.int64,), 2)
    check_tensor("probs", probs, (torch.float32,), 3)
    check_tensor("uniforms", uniforms, (torch.float32,), 2)
    batch, num_nodes = parents.shape
    if probs.shape[:2] != parents.shape or probs.shape[2] == 0:
        raise ValueError(f"probs has shape {tuple(probs.shape)}; expected ({batch}, {num_nodes}, V>0)")
    check_shape("uniforms", uniforms, parents.shape)
    if not capturing() and (bool((tokens >= probs.shape[2]).any()) or bool((tokens < -1).any())):
        raise ValueError(f"tokens must lie in [0, {probs.shape[2]}) or be -1 (padding)")
    # Sampling is the new part; verification is greedy's, against the sampled targets.
    target = sample_tokens(probs.reshape(batch * num_nodes, -1), uniforms.reshape(-1)).view(batch, num_nodes)
    return verify_greedy(parents, tokens, target)
