import pytest
import torch

from treedec.ops import compact_kv


def compact_by_loop(cache, prefix_len, accept_nodes):
    out = cache.clone()
    for b in range(cache.shape[0]):
        for j, node in enumerate(accept_nodes[b].tolist()):
            if node >= 0:
                out[b, :, prefix_len[b] + j] = cache[b, :, prefix_len[b] + node]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_layers_compacted_in_place(dtype):
    batch, heads, rows, dim = 3, 2, 40, 5
    caches = [torch.randn(batch, heads, rows, dim).to(dtype) for _ in range(4)]
    expected_input = [c.clone() for c in caches]
    prefix_len = torch.tensor([0, 11, 30], dtype=torch.int32)
    accept_nodes = torch.tensor(
        [[0, 2, 5, 6, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1], [0, 1, 2, 3, 4, 5, 6]], dtype=torch.int32
    )
    compact_kv(caches, prefix_len, accept_nodes)
    for got, before in zip(caches, expected_input):
        assert torch.equal(got, compact_by_loop(before, prefix_len.tolist(), accept_nodes))


def test_bad_arguments_raise():
    cache = torch.zeros(1, 1, 8, 2)
    with pytest.raises(ValueError, match="root path"):
        compact_kv([cache], torch.tensor([0], dtype=torch.int32), torch.tensor([[1, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match="fit in"):
        compact_kv([cache], torch.tensor([7], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-empty list"):
        compact_kv([], torch.tensor([0], dtype=torch.int32), torch.tensor([[0]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"caches\[1\] has shape"):
        compact_kv([cache, torch.zeros(2, 1, 8, 2)], torch.tensor([0], dtype=torch.int32),
                   torch.tensor([[0]], dtype=torch.int32))
