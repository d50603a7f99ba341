from collections.abc import Callable

import torch

from .. import reference
from . import _triton
from ._checks import capturing, check_same_device, check_tensor
from .registry import Op, Rule

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _reference(q, k, v, prefix_len, tree_mask, kv_start, scale, window=None, softcap=None):
    return reference.tree_attention(q, k, v, prefix_len, tree_mask, kv_start, scale, window=window, softcap=softcap)


def window_or_softcap_on_a_gpu(q, k, v, prefix_len, tree_mask, kv_start, scale, window=None, softcap=None):
    """The kernel's sliding window and soft-cap are tested against the reference under Triton's
    CPU interpreter only: until they have run on a GPU, auto keeps such layers on the reference
    there (TREEDEC_BACKEND=triton runs the kernel)."""
    if q.device.type == "cuda" and (window is not None or softcap is not None):
        return "a sliding window or soft-cap: not yet run on a GPU (TREEDEC_BACKEND=triton runs it)"
    return None


TREE_ATTENTION = Op(
    "tree_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor prefix_len, Tensor tree_mask, Tensor? kv_start, float? scale, "
    "int? window, float? softcap, str backend) -> Tensor",
    _reference, lambda q, k, v, prefix_len, tree_mask, kv_start, scale, window, softcap: torch.empty_like(q),
    avoids={"triton": [Rule("a sliding window or soft-cap on a GPU (not yet run on one)", window_or_softcap_on_a_gpu)]},
    triton=_triton.tree_attention,
)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    scale: float | None = None,
    check_values: bool = True,
    dense_mask: Callable[[], torch.Tensor] | None = None,
    window: int | None = None,
    softcap: float | None = None,
    unmasked: Callable[[], bool] | None = None,
    causal: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Attention of T tree nodes over their prefix and their own ancestors.

    Parameters
    ----------
    q : [B, Hq, T, D]
    k, v : [B, Hkv, S, D]
        The cache with the tree's keys/values already written at rows [prefix_len[b], prefix_len[b] + T).
        Hq must be a multiple of Hkv (GQA).
    prefix_len : int32 [B]
    tree_mask : int32 [B, T, ceil(T/32)]
        Packed ancestor mask from `build_tree`.
    kv_start : int32 [B], optional
        First visible cache row (left padding); 0 when omitted. Rows below it are never read.
    scale : float, optional
        Softmax scale; 1/sqrt(D) when omitted.
    check_values : bool
        False skips the one check that reads a tensor's values (prefix_len + T within the cache
        rows), for a caller that ensured it: the decode loop calls this once per layer, and that
        read makes a GPU's host wait for every queued kernel (two waits a layer, 60 a step for a
        30-layer model); its cache checks the rows once a step. Types and shapes are checked
        either way.
    dense_mask : callable, optional
        For the reference (SDPA with a dense mask): gives the bool [B, 1, T, max(prefix_len) + T]
        mask of these arguments (`reference.dense_tree_mask`), so a caller running every layer
        of one step builds it once (TreeStep.dense_mask). Other backends read the packed mask.
        With `window` it must be the windowed mask.
    window : int, optional
        A sliding-window layer's window: each node sees only the rows fewer than `window`
        positions behind it, its position being its prefix length plus its depth
        (`reference.dense_tree_mask`).
    softcap : float, optional
        Gemma 2's attention-logit soft-cap: scores become softcap * tanh(scores / softcap).
    unmasked : callable, optional
        With `dense_mask`, for the reference: whether that mask is all true (TreeStep.unmasked,
        known on the host), so the reference need not read it back to pick SDPA's unmasked kernel.
    causal : callable, optional
        With `dense_mask`, for the reference: whether that mask is plain causal attention of the
        T nodes over themselves (TreeStep.causal: an unpadded prefill), so SDPA's causal kernel
        runs and skips the masked half of the scores, as HF's prefill does.

    The Triton kernel implements `window` and `softcap`; on a GPU, auto still runs the reference
    for them until they have run on one (`window_or_softcap_on_a_gpu`).

    Returns
    -------
    [B, Hq, T, D] in q's dtype.
    """
    _check_arguments(q, k, v, prefix_len, tree_mask, kv_start, check_values)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window = {window!r} must be a positive int")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap = {softcap!r} must be positive")
    args = (q, k, v, prefix_len, tree_mask, kv_start, scale, window, softcap)
    backend = TREE_ATTENTION.backend(q.device, *args)
    if backend == "reference" and dense_mask is not None and not torch.compiler.is_compiling():
        return reference.tree_attention(*args[:7], dense_mask=dense_mask(), window=window, softcap=softcap,
                                        unmasked=unmasked() if unmasked is not None else None,
                                        causal=causal is not None and causal())
    return TREE_ATTENTION.run(backend, *args)


def _check_arguments(q, k, v, prefix_len, tree_mask, kv_start, check_values: bool) -> None:
    check_tensor("q", q, FLOAT_DTYPES, 4)
    check_tensor("k", k, FLOAT_DTYPES, 4)
    check_tensor("v", v, FLOAT_DTYPES, 4)
    check_tensor("prefix_len", prefix_len, (torch.int32,), 1)
    check_tensor("tree_mask", tree_mask, (torch.int32,), 3)
    batch, q_heads, num_nodes, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [{batch}, Hkv, S, {head_dim}]")
    if q_heads % k.shape[1]:
        raise ValueError(f"q has {q_heads} heads, not a multiple of k's {k.shape[1]} (GQA groups)")
    words = (num_nodes + 31) // 32
    if tuple(tree_mask.shape) != (batch, num_nodes, words):
        raise ValueError(f"tree_mask has shape {tuple(tree_mask.shape)}; expected {(batch, num_nodes, words)}")
    if kv_start is not None:
        check_tensor("kv_start", kv_start, (torch.int32,), 1)
    check_same_device(q=q, k=k, v=v, prefix_len=prefix_len, tree_mask=tree_mask, kv_start=kv_start)
    if not check_values or capturing():
        return
    if int(prefix_len.min()) < 0 or int(prefix_len.max()) + num_nodes > k.shape[2]:
        raise ValueError(f"prefix_len + T must fit in the {k.shape[2]} cache rows of k and v")
