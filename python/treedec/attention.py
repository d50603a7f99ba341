"""The "treedec" attention backend registered with transformers.

Inside treedec's decode loop, `model(...)` is called with a `treedec_step` keyword (a
`TreeStep`); transformers forwards it to every attention call, which then runs tree attention
over the `TreeCache` buffers. Outside the loop (a plain forward on a patched model) there is no
`treedec_step` and the backend behaves exactly like "sdpa", mask included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import compat, ops, reference
from .profiling import NoProfile

ATTN_NAME = "treedec"


@dataclass
class TreeStep:
    """What every layer's attention needs for one forward of T tree nodes.

    prefix_len int32 [B]: cached rows per sequence; the tree is written after them.
    kv_start int32 [B]: first visible row (left padding); kv_start > prefix_len only in prefill.
    tree_mask int32 [B, T, ceil(T/32)]: packed ancestor mask.
    """

    prefix_len: torch.Tensor
    kv_start: torch.Tensor
    tree_mask: torch.Tensor
    # int64 [A] or None: the step runs only these batch rows of the cache (layer-skip batching);
    # prefix_len, kv_start and tree_mask then hold those rows' entries, in this order.
    cache_rows: torch.Tensor | None = None
    # times attention when the loop profiles (the verify forward's steps; drafters' forwards do not)
    profile: object = field(default_factory=NoProfile, repr=False)
    # the step as the loop built it, on the host, when this is its copy on a device: facts about
    # the rows (`longest`, `unmasked`) are read there, since reading them from a GPU's copy would
    # make the host wait for the device at every layer
    host: TreeStep | None = field(default=None, repr=False)
    # the nodes are one chain in order (node i's parent is i - 1): a prefill's causal block
    chain: bool = False
    _per_device: dict = field(default_factory=dict, repr=False)  # device -> this step's tensors there
    _dense: dict = field(default_factory=dict, repr=False)  # window (None: none) -> the dense mask
    _facts: dict = field(default_factory=dict, repr=False)  # longest, unpadded, unmasked, causal: read once a step

    @property
    def num_nodes(self) -> int:
        return self.tree_mask.shape[1]

    def on(self, device: torch.device) -> TreeStep:
        """This step's tensors on `device` (layers may live on several devices); built once each."""
        if self.tree_mask.device == device:
            return self
        if device not in self._per_device:
            self._per_device[device] = TreeStep(
                self.prefix_len.to(device), self.kv_start.to(device), self.tree_mask.to(device),
                None if self.cache_rows is None else self.cache_rows.to(device), self.profile, self,
            )
        return self._per_device[device]

    def longest(self) -> int:
        """max(prefix_len): the longest committed prefix of the step's rows."""
        if self.host is not None:
            return self.host.longest()
        if "longest" not in self._facts:
            self._facts["longest"] = int(self.prefix_len.max())
        return self._facts["longest"]

    def unpadded(self) -> bool:
        """Whether no row has left padding (kv_start all 0)."""
        if self.host is not None:
            return self.host.unpadded()
        if "unpadded" not in self._facts:
            self._facts["unpadded"] = int(self.kv_start.abs().max()) == 0
        return self._facts["unpadded"]

    def unmasked(self, window: int | None) -> bool:
        """Whether the dense mask is all true: one node (a plain decode step), every row at the
        same length with no left padding, and the window (if any) wider than every row."""
        if self.host is not None:
            return self.host.unmasked(window)
        key = ("unmasked", window)
        if key not in self._facts:
            longest = self.longest()
            self._facts[key] = (self.num_nodes == 1 and self.unpadded()
                                and int(self.prefix_len.min()) == longest and (window is None or longest < window))
        return self._facts[key]

    def causal(self, window: int | None) -> bool:
        """Whether the dense mask is plain causal attention of the nodes over themselves: a chain
        on an empty cache with no left padding (an unpadded prefill), and the window (if any) no
        narrower than the chain, so SDPA's causal kernel can skip the masked half."""
        if self.host is not None:
            return self.host.causal(window)
        key = ("causal", window)
        if key not in self._facts:
            self._facts[key] = (self.chain and self.longest() == 0 and self.unpadded()
                                and (window is None or self.num_nodes <= window))
        return self._facts[key]

    def subset(self, rows: torch.Tensor) -> TreeStep:
        """This step for the batch rows `rows` (int64 [A], ascending) only."""
        host = rows.cpu()
        return TreeStep(self.prefix_len[host], self.kv_start[host], self.tree_mask[host], host, self.profile)

    def dense_mask(self, window: int | None = None) -> torch.Tensor:
        """bool [B, 1, T, max(prefix_len) + T] for the reference path (`window`: a sliding-window
        layer's); built once per step, device and window."""
        if window not in self._dense:
            kv_len = self.longest() + self.num_nodes
            self._dense[window] = reference.dense_tree_mask(
                self.prefix_len, self.tree_mask, self.kv_start, self.num_nodes, kv_len, window
            )
        return self._dense[window]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """q [B, Hq, T, D] over cache buffers k, v [B, Hkv, S, D] -> [B, Hq, T, D]; `window` and
        `softcap` as ops.tree_attention takes them."""
        step = self.on(q.device)
        with self.profile.phase("attention"):
            if step.cache_rows is not None:  # a row subset: its sequences' cache rows, gathered
                k, v = ops.gather_rows(k, step.cache_rows), ops.gather_rows(v, step.cache_rows)
            # the cache checked this step's rows (begin_step): no per-layer read of prefix_len, which
            # would make a GPU's host wait at every layer; the reference's dense mask is built once a step
            return ops.tree_attention(q, k, v, step.prefix_len, step.tree_mask, step.kv_start, scale,
                                      check_values=False, dense_mask=lambda: step.dense_mask(window),
                                      window=window, softcap=softcap, unmasked=lambda: step.unmasked(window),
                                      causal=lambda: step.causal(window))


def layer_window(module, kwargs: dict) -> int | None:
    """The sliding window of the attention layer `module`, or None: what the layer passes
    (Mistral, Qwen2, Gemma), else what it keeps (Qwen2-MoE keeps it and does not pass it; its
    mask, which the loop's own mask replaces, holds it). transformers writes 0 for none."""
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    return int(window) if window else None


def treedec_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-interface signature; returns ([B, T, Hq, D], None)."""
    step = kwargs.get("treedec_step")
    softcap = kwargs.get("softcap")
    if step is None:
        if softcap is not None:  # sdpa has no soft-cap (transformers picks eager for such models)
            return softcapped_forward(query, key, value, attention_mask, scaling, softcap), None
        return compat.sdpa_attention_forward()(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = step.attend(query, key, value, scaling, layer_window(module, kwargs), softcap)
    return out.transpose(1, 2).contiguous(), None


def softcapped_forward(query, key, value, attention_mask, scaling, softcap: float) -> torch.Tensor:
    """A forward outside the loop with soft-capped scores: transformers' eager attention over the
    sdpa mask treedec's mask function made (bool, or None for a plain causal forward)."""
    num_queries, num_keys = query.shape[2], key.shape[2]
    if attention_mask is None:
        rows = torch.arange(num_keys, device=query.device)
        mask = rows.view(1, -1) <= torch.arange(num_queries, device=query.device).view(-1, 1) + num_keys - num_queries
    else:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        mask = mask[..., :num_keys]
    out = reference.softcapped_attention(query, key, value, mask.expand(query.shape[0], 1, num_queries, num_keys),
                                         scaling, softcap)
    return out.transpose(1, 2).contiguous()


def treedec_mask(*args, **kwargs):
    """Outside the decode loop masks are sdpa's; inside it the loop passes its own 4D mask,
    which transformers hands to the attention function unchanged."""
    return compat.sdpa_mask_function()(*args, **kwargs)


_registered = False


def register() -> None:
    """Register the backend and its mask function under "treedec" (idempotent)."""
    global _registered
    if _registered:
        return
    attention_interface, mask_interface = compat.attention_registries()
    attention_interface.register(ATTN_NAME, treedec_attention_forward)
    mask_interface.register(ATTN_NAME, treedec_mask)
    _registered = True
