"""TreeCache: per-layer KV buffers with a committed length per sequence.

Buffers are [B, H_kv, capacity, D] per layer, on that layer's device. Sequence b has
prefix_len[b] committed rows; a step writes its T tree rows at [prefix_len[b], prefix_len[b] + T)
and `compact` keeps the accepted path. Rows below kv_start[b] are left padding, never read.
The buffers start at `initial_len` rows and grow in chunks as steps need rows, up to `max_len`
(the most the call can use): a call asking for a million new tokens that stops at its first
reserves no more than one that asks for a few hundred, as HF's growing cache does.
"""

from __future__ import annotations

import contextlib

import torch

# Rows a cache grows by, at least; past that by half its size, so a long call copies its buffers
# O(log) times and holds at most 1.5x the rows it uses.
GROWTH_ROWS = 256

from . import compat, ops

Cache = compat.cache_base_class()


class TreeCache(Cache):
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        devices: list[torch.device] | torch.device,
        initial_len: int | None = None,
    ):
        super().__init__(layers=[])
        if not isinstance(devices, (list, tuple)):
            devices = [torch.device(devices)] * num_layers
        if len(devices) != num_layers:
            raise ValueError(f"devices has {len(devices)} entries for {num_layers} layers")
        capacity = max_len if initial_len is None else max(1, min(initial_len, max_len))
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]  # per layer
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.max_len = max_len  # rows a sequence may ever need; the buffers hold `capacity`
        self.prefix_len = torch.zeros(batch_size, dtype=torch.int32)  # [B], host copy is the truth
        self.kv_start = torch.zeros(batch_size, dtype=torch.int32)  # [B]
        self._rows: dict[torch.device, torch.Tensor] = {}  # this step's write rows [B, T] per device
        self._num_nodes = 0
        self._uniform_prefix: int | None = None
        self._write_rows: torch.Tensor | None = None  # int64 [A]: the sequences the next writes cover
        self._written = [False] * num_layers  # whether each layer has written rows (its head count is fixed)

    # -- transformers' Cache protocol -------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Write this step's T rows of layer `layer_idx`; return the whole buffers."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        num_nodes = key_states.shape[2]
        if num_nodes != self._num_nodes:
            raise RuntimeError(f"TreeCache.begin_step was given T={self._num_nodes}; the model wrote {num_nodes}")
        if key_states.shape[1] != keys.shape[1]:
            keys, values = self._adopt_heads(layer_idx, key_states.shape[1])
        self._written[layer_idx] = True
        if self._write_rows is not None:  # layer-skip batching: only these sequences run this layer
            sub = self._write_rows.to(keys.device)
            rows = self._rows_on(keys.device).index_select(0, sub)
            keys[sub.view(-1, 1), :, rows] = key_states.transpose(1, 2)
            values[sub.view(-1, 1), :, rows] = value_states.transpose(1, 2)
        elif self._uniform_prefix is not None:  # one slice copy when every sequence is at the same row
            start = self._uniform_prefix
            keys[:, :, start : start + num_nodes] = key_states
            values[:, :, start : start + num_nodes] = value_states
        else:
            rows = self._rows_on(keys.device)
            batch = torch.arange(keys.shape[0], device=keys.device).view(-1, 1)
            keys[batch, :, rows] = key_states.transpose(1, 2)  # indexed dims lead: [B, T, H, D]
            values[batch, :, rows] = value_states.transpose(1, 2)
        return keys, values

    def _adopt_heads(self, layer: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer` writes `heads` KV heads, not the count its buffers were made with: under
        tensor parallelism a model's plan may gather a layer's keys and values on every rank (OLMo
        2's does, for its norm over all heads), where the adapter counted the rank's shard of
        k_proj. Until the layer has written rows, its buffers take the count it writes."""
        if self._written[layer]:
            raise RuntimeError(f"layer {layer} wrote {heads} KV heads into a cache holding "
                               f"{self.keys[layer].shape[1]}")
        batch, _, capacity, head_dim = self.keys[layer].shape
        for buffers in (self.keys, self.values):
            buffers[layer] = buffers[layer].new_zeros(batch, heads, capacity, head_dim)
        return self.keys[layer], self.values[layer]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.prefix_len.max()) if self.prefix_len.numel() else 0

    def get_max_length(self) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.keys)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.keys)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.keys)

    @property
    def is_compileable(self) -> bool:
        return False

    # -- treedec ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.prefix_len.shape[0]

    @property
    def capacity(self) -> int:
        """Rows per sequence the buffers hold now."""
        return self.keys[0].shape[2] if self.keys else self.max_len

    def reserve(self, rows: int) -> None:
        """Room for `rows` rows per sequence: the buffers grow by GROWTH_ROWS or half their size,
        whichever is more (up to max_len), one layer at a time, so growing holds one layer twice."""
        capacity = self.capacity
        if rows <= capacity:
            return
        grown = min(self.max_len, max(rows, capacity + max(GROWTH_ROWS, capacity // 2)))
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                new = old.new_zeros(*old.shape[:2], grown, old.shape[3])
                new[:, :, :capacity] = old
                buffers[layer] = new

    def fits(self, num_nodes: int) -> bool:
        """Whether a step of `num_nodes` rows after every sequence's prefix fits in max_len rows."""
        return int(self.prefix_len.max()) + num_nodes <= self.max_len

    def begin_step(self, num_nodes: int) -> None:
        """The next forward writes `num_nodes` rows after each sequence's prefix."""
        longest = int(self.prefix_len.max())
        if longest + num_nodes > self.max_len:
            raise ValueError(
                f"a {num_nodes}-node step after {longest} cached rows exceeds the cache's {self.max_len} rows"
            )
        self.reserve(longest + num_nodes)
        self._num_nodes = num_nodes
        shortest = int(self.prefix_len.min())
        self._uniform_prefix = longest if longest == shortest else None
        self._rows = {}

    @contextlib.contextmanager
    def writing_rows(self, rows: torch.Tensor):
        """Within the block, `update` takes key/value states for the sequences `rows` (int64 [A],
        distinct) only, and writes only their rows: a layer that runs on part of the batch."""
        self._write_rows = rows
        try:
            yield
        finally:
            self._write_rows = None

    @contextlib.contextmanager
    def scratch(self):
        """Within the block, rows written after the committed prefix (and `advance`d over) are
        scratch: on leaving it prefix_len is what it was, so the next step writes over them. A
        drafter that runs the model keeps its draft tokens' KV there for the drafts after them."""
        committed = self.prefix_len.clone()
        try:
            yield
        finally:
            self.prefix_len.copy_(committed)

    def _rows_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._rows:
            rows = self.prefix_len.view(-1, 1).long() + torch.arange(self._num_nodes).view(1, -1)
            self._rows[device] = rows.to(device)
        return self._rows[device]

    def compact(self, accept_nodes: torch.Tensor, accept_len: torch.Tensor) -> None:
        """Keep each sequence's root and accepted path (accept_nodes int32 [B, T]); advance prefix_len
        by accept_len + 1. All layers on one device go in one `compact_kv` call."""
        if not bool((accept_nodes[:, 1:] >= 0).any()):  # nothing accepted: only roots, already in place
            self.prefix_len += 1
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for keys, values in zip(self.keys, self.values):
            by_device.setdefault(keys.device, []).extend((keys, values))
        for device, tensors in by_device.items():
            ops.compact_kv(tensors, self.prefix_len.to(device), accept_nodes.to(device))
        self.prefix_len += accept_len.to(torch.int32).cpu() + 1

    def advance(self, num_rows: torch.Tensor | int) -> None:
        """Commit rows written in place (a prefill) without moving anything."""
        self.prefix_len += num_rows if isinstance(num_rows, int) else num_rows.to(torch.int32).cpu()

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the sequences at indices `keep` (int64 [B']), e.g. when others finished."""
        self.keys = [k.index_select(0, keep.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, keep.to(v.device)) for v in self.values]
        self.prefix_len = self.prefix_len.index_select(0, keep.cpu())
        self.kv_start = self.kv_start.index_select(0, keep.cpu())
