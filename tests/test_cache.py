"""TreeCache against transformers' own DynamicCache on the same inputs."""

import torch
from transformers import DynamicCache

from treedec.cache import TreeCache


def make_cache(batch=2, layers=2, rows=24):
    return TreeCache(layers, batch, 2, 4, rows, torch.float32, torch.device("cpu"))


def test_uniform_updates_match_dynamic_cache():
    ours, theirs = make_cache(), DynamicCache()
    for length in (5, 1, 3):
        cache_len = int(ours.prefix_len[0])
        for layer in range(2):
            k, v = torch.randn(2, 2, length, 4), torch.randn(2, 2, length, 4)
            ours.begin_step(length) if layer == 0 else None
            keys, values = ours.update(k, v, layer)
            ref_keys, ref_values = theirs.update(k, v, layer)
            n = cache_len + length
            assert torch.equal(keys[:, :, :n], ref_keys) and torch.equal(values[:, :, :n], ref_values)
        ours.advance(length)
    assert ours.get_seq_length() == theirs.get_seq_length() == 9


def test_ragged_rows_and_compaction():
    cache = make_cache(batch=2, layers=1)
    cache.prefix_len = torch.tensor([3, 7], dtype=torch.int32)
    cache.begin_step(4)
    k = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4)
    keys, _ = cache.update(k, -k, 0)
    assert torch.equal(keys[0, :, 3:7], k[0]) and torch.equal(keys[1, :, 7:11], k[1])
    accept_nodes = torch.tensor([[0, 2, -1, -1], [0, 1, 3, -1]], dtype=torch.int32)
    cache.compact(accept_nodes, torch.tensor([1, 2], dtype=torch.int32))
    assert cache.prefix_len.tolist() == [5, 10]
    assert torch.equal(cache.keys[0][0, :, 4], k[0, :, 2])
    assert torch.equal(cache.keys[0][1, :, 8:10], k[1, :, [1, 3]])
    cache.select(torch.tensor([1]))
    assert cache.batch_size == 1 and cache.prefix_len.tolist() == [10]
    assert torch.equal(cache.values[0][0, :, 9], -k[1, :, 3])


def test_overflow_raises():
    cache = make_cache(rows=8)
    cache.advance(6)
    try:
        cache.begin_step(4)
    except ValueError as error:
        assert "exceeds the cache's 8 rows" in str(error)
    else:
        raise AssertionError("a step past the cache's capacity must raise")


def test_buffers_grow_as_steps_need_rows_and_keep_what_they_hold(monkeypatch):
    from treedec import cache as cache_module

    monkeypatch.setattr(cache_module, "GROWTH_ROWS", 4)
    cache = TreeCache(2, 2, 2, 4, 40, torch.float32, torch.device("cpu"), initial_len=5)
    assert cache.capacity == 5 and cache.keys[0].shape == (2, 2, 5, 4)
    written = []
    for length in (3, 4, 1, 9):  # 3 fit; then 7 needs 5 + 4 = 9 rows; 17 needs max(17, 9 + 4)
        cache.begin_step(length)
        k = torch.randn(2, 2, length, 4)
        for layer in range(2):
            cache.update(k, k + layer, layer)
        written.append(k)
        cache.advance(length)
    assert cache.capacity == 17 and cache.max_len == 40
    held = torch.cat(written, dim=2)
    for layer in range(2):
        assert torch.equal(cache.keys[layer][:, :, :17], held)
        assert torch.equal(cache.values[layer][:, :, :17], held + layer)
    cache.begin_step(23)  # to max_len, not past it
    assert cache.capacity == 40


def test_a_layer_writing_other_kv_heads_first_resizes_only_its_buffers():
    """A tensor-parallel plan that gathers a layer's heads on every rank (OLMo 2's) writes more KV
    heads than the cache was sized for: before the layer's first rows its buffers take that count,
    the other layers keep theirs, and a later change of count is an error, not a silent overwrite."""
    import pytest

    cache = make_cache(batch=2, layers=2)  # sized for 2 KV heads
    cache.begin_step(5)
    k = torch.randn(2, 4, 5, 4)
    keys, values = cache.update(k, -k, 0)
    assert keys.shape == values.shape == (2, 4, 24, 4) and torch.equal(keys[:, :, :5], k)
    cache.update(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), 1)
    assert cache.keys[1].shape[1] == 2
    cache.advance(5)
    cache.begin_step(1)
    with pytest.raises(RuntimeError, match="wrote 2 KV heads into a cache holding 4"):
        cache.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4), 0)
