import torch

from . import _library
from ._backend import choose_backend
from ._checks import check_parents, check_same_device, check_shape, check_tensor


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
    backend = choose_backend(parents.device, "verify_greedy")
    if _library.compiling():
        return torch.ops.treedec.verify_greedy(parents, tokens, target, backend)
    return _library.implementation("verify_greedy", backend)(parents, tokens, target)
