"""The C++ CPU kernels (treedec._C) against the pure-torch references, through treedec.ops with
TREEDEC_BACKEND=cpp, plus the kernels' own safety on malformed input, every lm_head_topk
instruction set this CPU runs, backend selection and the torch.library registrations."""

import os

import pytest
import torch

from treedec import _native, ops, reference
from treedec.ops import _cpp
from helpers import make_parents  # noqa: E402

pytestmark = pytest.mark.skipif(_native.cpp() is None, reason="treedec._C is not built")

BATCHES = (1, 3, 5)
NODE_COUNTS = (1, 2, 7, 31, 32, 33, 64, 100)


@pytest.fixture(autouse=True)
def cpp_backend(monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", "cpp")


# -- trees --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_nodes", NODE_COUNTS)
@pytest.mark.parametrize("shape", ["chain", "star", "random"])
def test_build_tree_matches_reference(batch, num_nodes, shape):
    generator = torch.Generator().manual_seed(batch * 1000 + num_nodes)
    parents = make_parents(batch, num_nodes, shape, generator)
    depth, tree_mask = ops.build_tree(parents)
    ref_depth, ref_mask = reference.build_tree(parents)
    assert depth.dtype == torch.int32 and tree_mask.dtype == torch.int32
    assert torch.equal(depth, ref_depth)
    assert torch.equal(tree_mask, ref_mask)


@pytest.mark.parametrize(
    "bad, message",
    [
        ((0, 0, 3), r"parents\[0, 0\] = 3 must be -1"),
        ((1, 4, 7), r"parents\[1, 4\] = 7 must be < 4"),
        ((2, 5, 5), r"parents\[2, 5\] = 5 must be < 5"),
        ((1, 3, -2), r"parents\[1, 3\] = -2 must be >= 0"),
    ],
)
@pytest.mark.parametrize("op", ["build_tree", "verify_greedy"])
def test_malformed_trees_raise(bad, message, op):
    parents = make_parents(3, 9, "chain", torch.Generator().manual_seed(0))
    b, i, value = bad
    parents[b, i] = value
    with pytest.raises(ValueError, match=message):
        if op == "build_tree":
            ops.build_tree(parents)
        else:
            tokens = torch.zeros(3, 9, dtype=torch.int64)
            ops.verify_greedy(parents, tokens, tokens.clone())


def test_kernels_survive_malformed_trees():
    """Called directly (no Python validation), the kernels stay in bounds, terminate, report the
    first bad node, and still write every output element."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        batch, num_nodes = 3, 40
        parents = torch.randint(-5, 60, (batch, num_nodes), generator=generator, dtype=torch.int32)
        with pytest.raises(ValueError, match="kernel check"):
            _cpp.build_tree(parents)
        tokens = torch.randint(-1, 3, (batch, num_nodes), generator=generator)
        target = torch.randint(0, 3, (batch, num_nodes), generator=generator)
        with pytest.raises(ValueError, match="kernel check"):
            _cpp.verify_greedy(parents, tokens, target)
    # A cycle through a forward pointer must not hang either.
    parents = torch.tensor([[-1, 2, 1, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"parents\[0, 1\]"):
        _cpp.verify_greedy(parents, torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64))


# -- verification -------------------------------------------------------------------------------


def draft_tokens(parents, target, accept_rate, pad_rate, generator):
    """Tokens that match the parent's target with probability accept_rate; some padding (-1)."""
    batch, num_nodes = parents.shape
    parent = parents.long().clamp(min=0)
    wanted = target.gather(1, parent)
    random_tokens = torch.randint(0, 5, (batch, num_nodes), generator=generator)
    tokens = torch.where(torch.rand(batch, num_nodes, generator=generator) < accept_rate, wanted, random_tokens)
    tokens = torch.where(torch.rand(batch, num_nodes, generator=generator) < pad_rate, -1, tokens)
    tokens[:, 0] = target[:, 0]  # the root's own token is irrelevant
    return tokens.contiguous()


def assert_verify_matches(parents, tokens, target):
    out = ops.verify_greedy(parents, tokens, target)
    ref = reference.verify_greedy(parents, tokens, target)
    for name, got, want in zip(("accept_len", "accept_nodes", "bonus"), out, ref):
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), f"{name}: {got} != {want}"
    return out


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_nodes", NODE_COUNTS)
@pytest.mark.parametrize("shape", ["chain", "star", "random"])
def test_verify_greedy_matches_reference(batch, num_nodes, shape):
    generator = torch.Generator().manual_seed(7 * batch + num_nodes)
    parents = make_parents(batch, num_nodes, shape, generator)
    target = torch.randint(0, 5, (batch, num_nodes), generator=generator)
    for accept_rate, pad_rate in ((0.0, 0.0), (0.5, 0.1), (0.9, 0.0), (1.0, 0.0), (1.0, 0.3)):
        tokens = draft_tokens(parents, target, accept_rate, pad_rate, generator)
        assert_verify_matches(parents, tokens, target)


@pytest.mark.parametrize("num_nodes", (2, 33, 100))
def test_verify_all_rejected_and_all_accepted(num_nodes):
    parents = make_parents(3, num_nodes, "chain", torch.Generator().manual_seed(0))
    target = torch.arange(3 * num_nodes).view(3, num_nodes)
    accepted = torch.cat([target[:, :1], target[:, :-1]], dim=1)  # node i's token = target of node i-1
    accept_len, accept_nodes, bonus = assert_verify_matches(parents, accepted, target)
    assert accept_len.tolist() == [num_nodes - 1] * 3
    assert torch.equal(accept_nodes, torch.arange(num_nodes, dtype=torch.int32).expand(3, -1))
    assert torch.equal(bonus, target[:, -1])
    rejected = accepted + 10_000
    accept_len, accept_nodes, bonus = assert_verify_matches(parents, rejected, target)
    assert accept_len.tolist() == [0, 0, 0]
    assert (accept_nodes[:, 1:] == -1).all() and (accept_nodes[:, 0] == 0).all()
    assert torch.equal(bonus, target[:, 0])
    padded = torch.full_like(accepted, -1)  # padding nodes are never accepted, even if target is -1
    accept_len, _, _ = assert_verify_matches(parents, padded, torch.full_like(target, -1))
    assert accept_len.tolist() == [0, 0, 0]


def test_verify_equal_depth_goes_to_smallest_index():
    parents = torch.tensor([[-1, 0, 0, 1, 2]], dtype=torch.int32)
    tokens = torch.tensor([[9, 4, 4, 6, 6]])
    target = torch.tensor([[4, 6, 6, 0, 0]])
    accept_len, accept_nodes, bonus = assert_verify_matches(parents, tokens, target)
    assert accept_len.tolist() == [2] and accept_nodes.tolist() == [[0, 1, 3, -1, -1]]


# -- compaction ---------------------------------------------------------------------------------


def random_path(num_nodes, generator, accept_len=None):
    """An increasing root path (accept_nodes row) as the verifier would return it."""
    if accept_len is None:
        accept_len = int(torch.randint(0, num_nodes, (1,), generator=generator))
    chosen = torch.randperm(num_nodes - 1, generator=generator)[:accept_len].sort().values + 1
    row = torch.full((num_nodes,), -1, dtype=torch.int32)
    row[0] = 0
    row[1 : accept_len + 1] = chosen.to(torch.int32)
    return row


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_nodes", (1, 2, 7, 33, 64))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compact_kv_matches_reference(batch, num_nodes, dtype):
    generator = torch.Generator().manual_seed(batch * 100 + num_nodes)
    heads, capacity, head_dim, layers = 3, num_nodes + 50, 64, 4
    prefix_len = torch.randint(0, 51, (batch,), generator=generator, dtype=torch.int32)  # ragged
    accept_nodes = torch.stack([random_path(num_nodes, generator) for _ in range(batch)])
    if batch > 1:
        accept_nodes[0] = random_path(num_nodes, generator, accept_len=0)  # nothing accepted
        accept_nodes[1] = torch.arange(num_nodes, dtype=torch.int32)  # everything, nothing moves
    caches = [torch.randn(batch, heads, capacity, head_dim, generator=generator).to(dtype) for _ in range(2 * layers)]
    expected = [c.clone() for c in caches]
    reference.compact_kv(expected, prefix_len, accept_nodes)
    ops.compact_kv(caches, prefix_len, accept_nodes)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


def test_compact_kv_mixed_shapes_and_views():
    """Per-tensor shapes, dtypes and strides: a [B, S, H, D] buffer seen as [B, H, S, D], a
    tensor with non-contiguous rows (reference path), different head counts and dims."""
    generator = torch.Generator().manual_seed(3)
    batch, capacity, num_nodes = 3, 40, 9
    prefix_len = torch.tensor([0, 17, 31], dtype=torch.int32)
    accept_nodes = torch.stack([random_path(num_nodes, generator, accept_len=n) for n in (3, 8, 1)])
    caches = [
        torch.randn(batch, 2, capacity, 16, generator=generator),
        torch.randn(batch, capacity, 4, 8, generator=generator).to(torch.bfloat16).transpose(1, 2),
        torch.randn(batch, 5, capacity, 32, generator=generator, dtype=torch.float64),
        torch.randn(batch, 2, 6, capacity, generator=generator).transpose(2, 3),  # D not contiguous
    ]
    expected = [c.clone() for c in caches]
    reference.compact_kv(expected, prefix_len, accept_nodes)
    ops.compact_kv(caches, prefix_len, accept_nodes)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


def test_compact_kv_kernel_skips_malformed_paths():
    module = _native.require_cpp()
    cache = torch.arange(2 * 1 * 10 * 4, dtype=torch.float32).view(2, 1, 10, 4)
    before = cache.clone()
    prefix_len = torch.tensor([8, 2], dtype=torch.int32)  # row 0: 8 + T > S
    accept_nodes = torch.tensor([[0, 1, 2], [0, 7, 1]], dtype=torch.int32)  # row 1: 7 >= T, 1 < position
    meta = [cache.data_ptr(), 1, 16, cache.stride(0) * 4, cache.stride(1) * 4, cache.stride(2) * 4]
    skipped = module.compact_kv(meta, prefix_len.data_ptr(), accept_nodes.data_ptr(), 2, 10, 3, 1)
    assert skipped == 3 + 1  # all of row 0; node 7 of row 1 (then node 1 sits at position 1, nothing moves)
    assert torch.equal(cache, before)


# -- LM head top-k ------------------------------------------------------------------------------


def check_topk(hidden, weight, k, values, indices):
    """Same ids as torch.topk(hidden @ weight.T) up to ties: every returned id's reference logit
    equals the reference top-k value in its slot, within the reference's own rounding."""
    ref_values, ref_indices = reference.lm_head_topk(hidden, weight, k)
    exact = hidden.double() @ weight.double().T  # [N, V]
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (hidden.shape[0], k)
    if hidden.dtype == torch.bfloat16:
        tolerance = ref_values.abs().clamp(min=1.0) * 2**-7  # one bf16 ulp
    else:
        tolerance = ref_values.abs().clamp(min=1.0) * 1e-5
    got_exact = exact.gather(1, indices)
    assert torch.all((got_exact - ref_values.double()).abs() <= tolerance), "picked a clearly worse id"
    assert torch.all((values.double() - ref_values.double()).abs() <= tolerance)
    assert torch.all(values[:, :-1] >= values[:, 1:]), "values must be sorted, largest first"
    assert len(set(indices[0].tolist())) == k, "ids must be distinct"
    agree = (indices == ref_indices).float().mean().item()
    assert agree > (0.9 if k == 1 else 0.6), f"only {agree:.2f} of ids agree with torch.topk"


def isas(bf16: bool) -> list[str]:
    return list(_native.require_cpp().supported_isas(bf16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab, width", [(1, 49152, 576), (5, 49152, 576), (16, 1000, 64), (33, 517, 123)])
@pytest.mark.parametrize("k", [1, 8])
def test_lm_head_topk_matches_reference(dtype, rows, vocab, width, k, monkeypatch):
    generator = torch.Generator().manual_seed(rows * vocab + width + k)
    hidden = torch.randn(rows, width, generator=generator).to(dtype)
    weight = (torch.randn(vocab, width, generator=generator) / width**0.5).to(dtype)
    for isa in isas(dtype == torch.bfloat16):
        monkeypatch.setenv("TREEDEC_CPU_ISA", isa)
        values, indices = ops.lm_head_topk(hidden, weight, k)
        check_topk(hidden, weight, k, values, indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_topk_ties_nan_and_strides(dtype, monkeypatch):
    generator = torch.Generator().manual_seed(11)
    vocab, width = 1031, 100
    weight = torch.randn(vocab, width, generator=generator).to(dtype)
    hidden = torch.randn(4, width, generator=generator).to(dtype)
    best = (hidden.float() @ weight.float().T).argmax(1)
    weight[1030] = weight[int(best[0])]  # an exact duplicate after the best row: the first id wins
    weight[3] = weight[int(best[1])]  # an exact duplicate before it: now id 3 wins for row 1
    for isa in isas(dtype == torch.bfloat16):
        monkeypatch.setenv("TREEDEC_CPU_ISA", isa)
        for threads in ("1", "2"):
            monkeypatch.setenv("TREEDEC_CPU_THREADS", threads)
            _, indices = ops.lm_head_topk(hidden, weight, 1)
            assert int(indices[0, 0]) == min(int(best[0]), 1030)
            assert int(indices[1, 0]) == min(int(best[1]), 3)
            _, indices = ops.lm_head_topk(hidden, weight, 2)
            assert indices[1].tolist() == sorted([int(best[1]), 3]) if int(best[1]) != 3 else True
    # NaN ranks first, as in torch.topk and argmax; nothing crashes.
    poisoned = weight.clone()
    poisoned[500, 0] = float("nan")
    values, indices = ops.lm_head_topk(hidden, poisoned, 3)
    assert (indices[:, 0] == 500).all() and torch.isnan(values[:, 0]).all()
    # Strided views: a hidden slice with a row stride, and rows of a wider weight buffer.
    wide = torch.randn(vocab, width + 7, generator=generator).to(dtype)
    view = wide[:, 3 : 3 + width]
    strided_hidden = torch.randn(8, 2 * width, generator=generator).to(dtype)[::2, :width]
    values, indices = ops.lm_head_topk(strided_hidden, view, 5)
    check_topk(strided_hidden, view, 5, values, indices)


def test_lm_head_topk_float16_takes_reference():
    hidden = torch.randn(3, 32).half()
    weight = torch.randn(50, 32).half()
    values, indices = ops.lm_head_topk(hidden, weight, 4)
    ref_values, ref_indices = reference.lm_head_topk(hidden, weight, 4)
    assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)


# -- backend selection and registration ---------------------------------------------------------


def test_backend_selection(monkeypatch):
    assert ops.available_backends()["cpp"] is True
    cpu = torch.device("cpu")
    monkeypatch.setenv("TREEDEC_BACKEND", "auto")
    assert ops.choose_backend(cpu) == "cpp"
    assert ops.choose_backend(cpu, "verify_greedy") == "cpp"
    assert ops.choose_backend(cpu, "tree_attention") == "reference"  # no C++ attention kernel
    monkeypatch.setenv("TREEDEC_BACKEND", "reference")
    assert ops.choose_backend(cpu, "lm_head_topk") == "reference"
    if not ops.available_backends()["cuda"]:
        monkeypatch.setenv("TREEDEC_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="TREEDEC_BACKEND=cuda was requested"):
            ops.build_tree(torch.tensor([[-1, 0]], dtype=torch.int32))
    monkeypatch.setenv("TREEDEC_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        ops.choose_backend(cpu)


def test_custom_ops_are_registered_and_opaque_to_compile():
    parents = make_parents(2, 9, "random", torch.Generator().manual_seed(5))
    tokens = torch.randint(0, 3, (2, 9))
    target = torch.randint(0, 3, (2, 9))
    for name in ("build_tree", "verify_greedy", "compact_kv", "tree_attention", "lm_head_topk"):
        assert hasattr(torch.ops.treedec, name)
    torch.library.opcheck(torch.ops.treedec.build_tree.default, (parents, "cpp"))
    torch.library.opcheck(torch.ops.treedec.verify_greedy.default, (parents, tokens, target, "cpp"))
    hidden, weight = torch.randn(3, 16), torch.randn(40, 16)
    torch.library.opcheck(torch.ops.treedec.lm_head_topk.default, (hidden, weight, 4, "cpp"))

    @torch.compile(backend="eager", fullgraph=True)
    def step(parents, tokens, target, hidden, weight):
        _, tree_mask = torch.ops.treedec.build_tree(parents, "cpp")
        accept_len, _, bonus = torch.ops.treedec.verify_greedy(parents, tokens, target, "cpp")
        _, ids = torch.ops.treedec.lm_head_topk(hidden, weight, 2, "cpp")
        return tree_mask.sum() + accept_len.sum() + bonus.sum() + ids.sum()

    expected = (
        reference.build_tree(parents)[1].sum()
        + reference.verify_greedy(parents, tokens, target)[0].sum()
        + reference.verify_greedy(parents, tokens, target)[2].sum()
        + reference.lm_head_topk(hidden, weight, 2)[1].sum()
    )
    assert int(step(parents, tokens, target, hidden, weight)) == int(expected)


def test_compact_kv_custom_op_mutates_in_place():
    generator = torch.Generator().manual_seed(9)
    caches = [torch.randn(2, 2, 20, 8, generator=generator) for _ in range(4)]
    prefix_len = torch.tensor([3, 5], dtype=torch.int32)
    accept_nodes = torch.tensor([[0, 2, 5, -1, -1, -1], [0, 1, 4, 5, -1, -1]], dtype=torch.int32)
    expected = [c.clone() for c in caches]
    reference.compact_kv(expected, prefix_len, accept_nodes)
    torch.ops.treedec.compact_kv(caches, prefix_len, accept_nodes, "cpp")
    assert all(torch.equal(a, b) for a, b in zip(caches, expected))


def test_environment_override_is_read_per_call(monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", "reference")
    assert ops.choose_backend(torch.device("cpu"), "build_tree") == "reference"
    monkeypatch.delenv("TREEDEC_BACKEND")
    assert os.environ.get("TREEDEC_BACKEND") is None
    assert ops.choose_backend(torch.device("cpu"), "build_tree") == "cpp"
