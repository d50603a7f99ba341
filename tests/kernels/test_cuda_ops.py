"""treedec._cuda (csrc/cuda/*.cu) against treedec.reference, called through its raw-pointer API.

GPU only: skipped without a CUDA device or without the built extension
(`TREEDEC_BUILD_CUDA=1 pip install --no-build-isolation -e .`).
"""

import pytest
import torch

from treedec import reference
from helpers import make_parents  # noqa: E402

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
try:
    from treedec import _cuda
except ImportError as error:  # pragma: no cover - depends on the build
    pytest.skip(f"treedec._cuda is not built ({error})", allow_module_level=True)

BATCHES = (1, 3, 5)
NODES = (1, 2, 7, 31, 32, 33, 64, 100)
SHAPES = ("chain", "star", "random")


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def cuda_build_tree(parents: torch.Tensor):
    batch, num_nodes = parents.shape
    parents = parents.cuda().contiguous()
    depth = torch.full((batch, num_nodes), -7, dtype=torch.int32, device="cuda")
    tree_mask = torch.full((batch, num_nodes, (num_nodes + 31) // 32), -7, dtype=torch.int32, device="cuda")
    _cuda.build_tree(parents.data_ptr(), depth.data_ptr(), tree_mask.data_ptr(), batch, num_nodes, stream())
    torch.cuda.synchronize()
    return depth.cpu(), tree_mask.cpu()


def cuda_verify_greedy(parents, tokens, target):
    batch, num_nodes = parents.shape
    parents, tokens, target = parents.cuda(), tokens.cuda(), target.cuda()
    accept_len = torch.full((batch,), -7, dtype=torch.int32, device="cuda")
    accept_nodes = torch.full((batch, num_nodes), -7, dtype=torch.int32, device="cuda")
    bonus = torch.full((batch,), -7, dtype=torch.int64, device="cuda")
    _cuda.verify_greedy(
        parents.data_ptr(), tokens.data_ptr(), target.data_ptr(), accept_len.data_ptr(), accept_nodes.data_ptr(),
        bonus.data_ptr(), batch, num_nodes, stream(),
    )
    torch.cuda.synchronize()
    return accept_len.cpu(), accept_nodes.cpu(), bonus.cpu()


def cuda_compact_kv(caches, prefix_len, accept_nodes):
    batch, heads, seq_len, head_dim = caches[0].shape
    pointers = torch.tensor([cache.data_ptr() for cache in caches], dtype=torch.int64, device="cuda")
    prefix_len, accept_nodes = prefix_len.cuda(), accept_nodes.cuda()
    _cuda.compact_kv(
        pointers.data_ptr(), len(caches), prefix_len.data_ptr(), accept_nodes.data_ptr(), batch, heads, seq_len,
        head_dim, caches[0].element_size(), accept_nodes.shape[1], stream(),
    )
    torch.cuda.synchronize()


def draft(parents: torch.Tensor, gen: torch.Generator, vocab: int = 4, pad_fraction: float = 0.1):
    """tokens/target with a small vocabulary (many acceptances) and some padding nodes."""
    batch, num_nodes = parents.shape
    tokens = torch.randint(0, vocab, (batch, num_nodes), generator=gen)
    target = torch.randint(0, vocab, (batch, num_nodes), generator=gen)
    tokens[torch.rand(batch, num_nodes, generator=gen) < pad_fraction] = -1
    return tokens, target


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_nodes", NODES)
@pytest.mark.parametrize("batch", BATCHES)
def test_build_tree(batch, num_nodes, shape):
    parents = make_parents(batch, num_nodes, shape, torch.Generator().manual_seed(batch * 1000 + num_nodes))
    depth, tree_mask = cuda_build_tree(parents)
    expected_depth, expected_mask = reference.build_tree(parents)
    assert torch.equal(depth, expected_depth)
    assert torch.equal(tree_mask, expected_mask)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_nodes", NODES)
@pytest.mark.parametrize("batch", BATCHES)
def test_verify_greedy(batch, num_nodes, shape):
    gen = torch.Generator().manual_seed(batch * 1000 + num_nodes + len(shape))
    parents = make_parents(batch, num_nodes, shape, gen)
    tokens, target = draft(parents, gen)
    got = cuda_verify_greedy(parents, tokens, target)
    expected = reference.verify_greedy(parents, tokens, target)
    for name, value, want in zip(("accept_len", "accept_nodes", "bonus"), got, expected):
        assert torch.equal(value, want), name


@pytest.mark.parametrize("num_nodes", [2, 33, 100])
def test_verify_greedy_all_rejected_and_all_accepted(num_nodes):
    parents = make_parents(2, num_nodes, "chain", torch.Generator())
    target = torch.arange(2 * num_nodes).view(2, num_nodes) + 10
    tokens = torch.full_like(target, 3)  # sequence 0: every draft rejected
    tokens[1, 1:] = target[1, :-1]  # sequence 1: the whole chain accepted
    accept_len, accept_nodes, bonus = cuda_verify_greedy(parents, tokens, target)
    assert accept_len.tolist() == [0, num_nodes - 1]
    assert accept_nodes[0].tolist() == [0] + [-1] * (num_nodes - 1)
    assert accept_nodes[1].tolist() == list(range(num_nodes))
    assert bonus.tolist() == [int(target[0, 0]), int(target[1, -1])]


def test_verify_greedy_large_tree_uses_global_path():
    gen = torch.Generator().manual_seed(0)
    parents = make_parents(2, 9000, "random", gen)  # beyond the shared-memory staging limit
    tokens, target = draft(parents, gen, vocab=2, pad_fraction=0.0)
    got = cuda_verify_greedy(parents, tokens, target)
    expected = reference.verify_greedy(parents, tokens, target)
    for value, want in zip(got, expected):
        assert torch.equal(value, want)


def test_malformed_trees_terminate_in_bounds():
    parents = torch.tensor([[5, 0, 7, 2, -3, 4, 1, 0], [-1, 1, 1, 99, 3, -1, 0, 6]], dtype=torch.int32)
    depth, tree_mask = cuda_build_tree(parents)
    assert ((depth >= 0) & (depth < 8)).all()
    tokens = torch.zeros(2, 8, dtype=torch.int64)
    target = torch.zeros(2, 8, dtype=torch.int64)
    accept_len, accept_nodes, bonus = cuda_verify_greedy(parents, tokens, target)
    assert ((accept_len >= 0) & (accept_len < 8)).all()
    assert ((accept_nodes >= -1) & (accept_nodes < 8)).all()
    assert (accept_nodes[:, 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 3])
@pytest.mark.parametrize("batch,num_nodes", [(1, 7), (3, 33), (5, 64)])
def test_compact_kv(dtype, head_dim, batch, num_nodes):
    gen = torch.Generator().manual_seed(batch + num_nodes + head_dim)
    parents = make_parents(batch, num_nodes, "random", gen)
    tokens, target = draft(parents, gen, vocab=2, pad_fraction=0.0)
    _, accept_nodes, _ = reference.verify_greedy(parents, tokens, target)
    seq_len = 80 + num_nodes
    prefix_len = torch.randint(0, 80, (batch,), generator=gen, dtype=torch.int32)
    layers = [torch.randn(batch, 3, seq_len, head_dim, generator=gen).to(dtype) for _ in range(6)]
    expected = [layer.clone() for layer in layers]
    reference.compact_kv(expected, prefix_len, accept_nodes)
    caches = [layer.cuda() for layer in layers]
    cuda_compact_kv(caches, prefix_len, accept_nodes)
    for cache, want in zip(caches, expected):
        assert torch.equal(cache.cpu(), want)


def test_compact_kv_misaligned_view_and_sequential_semantics():
    """A view at an odd storage offset takes the byte path; results equal the in-order copy."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, seq_len, head_dim, num_nodes = 3, 2, 60, 64, 16
    storage = torch.randn(batch * heads * seq_len * head_dim + 1, generator=gen, dtype=torch.float32)
    prefix_len = torch.tensor([0, 10, 40], dtype=torch.int32)
    accept_nodes = torch.full((batch, num_nodes), -1, dtype=torch.int32)
    accept_nodes[0, :5] = torch.tensor([0, 1, 2, 3, 4])  # identity: nothing moves
    accept_nodes[1, :6] = torch.tensor([0, 2, 3, 7, 8, 15])  # rows that are both source and destination
    accept_nodes[2, :2] = torch.tensor([0, 15])
    want = storage[1:].view(batch, heads, seq_len, head_dim).clone()
    for b in range(batch):  # the sequential definition, row by row in increasing j
        for j, node in enumerate(accept_nodes[b].tolist()):
            if node >= 0:
                want[b, :, int(prefix_len[b]) + j] = want[b, :, int(prefix_len[b]) + node]
    device_storage = storage.cuda()
    view = device_storage[1:].view(batch, heads, seq_len, head_dim)
    assert view.data_ptr() % 16 != 0
    cuda_compact_kv([view], prefix_len, accept_nodes)
    assert torch.equal(view.cpu(), want)


def test_compact_kv_many_layers_one_launch():
    batch, heads, seq_len, head_dim, num_nodes = 8, 8, 300, 128, 64
    gen = torch.Generator().manual_seed(4)
    parents = make_parents(batch, num_nodes, "random", gen)
    tokens, target = draft(parents, gen, vocab=2, pad_fraction=0.0)
    _, accept_nodes, _ = reference.verify_greedy(parents, tokens, target)
    prefix_len = torch.randint(0, seq_len - num_nodes, (batch,), generator=gen, dtype=torch.int32)
    caches = [torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(60)]
    expected = [cache.clone() for cache in caches]
    reference.compact_kv(expected, prefix_len.cuda(), accept_nodes.cuda())
    cuda_compact_kv(caches, prefix_len, accept_nodes)
    for cache, want in zip(caches, expected):
        assert torch.equal(cache, want)
