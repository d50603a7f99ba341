"""verify_sample on the C++ backend (treedec._C's sample_tokens, then its verify_greedy) against
treedec.reference: bit-exact on random inputs and edge cases, malformed input rejected by
treedec.ops, and a statistical check that the emitted tokens follow the target distribution,
with a deliberately wrong verifier failing the same check."""

import math

import pytest
import torch

from treedec import _native, ops, reference
from treedec.ops import _cpp
from helpers import batch_parents, chain, make_parents  # noqa: E402

pytestmark = pytest.mark.skipif(_native.cpp() is None, reason="treedec._C is not built")

BATCHES = (1, 3, 5)
NODE_COUNTS = (1, 2, 7, 31, 32, 33, 64, 100)
VOCABS = (1, 5, 97, 1000)


@pytest.fixture(autouse=True)
def cpp_backend(monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", "cpp")


def cpp_verify_sample(parents, tokens, probs, uniforms):
    """The C++ kernels alone, no argument checks: what ops.verify_sample runs on the cpp backend."""
    batch, num_nodes, vocab = probs.shape
    target = _cpp.sample_tokens(probs.reshape(-1, vocab), uniforms.reshape(-1)).view(batch, num_nodes)
    return _cpp.verify_greedy(parents, tokens, target)


def random_inputs(batch, num_nodes, vocab, shape, generator):
    """Top-k style rows (exact zeros, never all zero), unnormalised, scaled by up to 1e3; drafts
    often hit the sampled token's neighbourhood, and about 10% of nodes are padding."""
    parents = make_parents(batch, num_nodes, shape, generator)
    probs = torch.rand(batch, num_nodes, vocab, generator=generator) ** 3
    probs = torch.where(torch.rand(batch, num_nodes, vocab, generator=generator) < 0.6, probs, 0.0)
    probs[..., torch.randint(0, vocab, (1,), generator=generator)] += 1e-3
    probs = probs * torch.rand(batch, num_nodes, 1, generator=generator) * 1e3
    tokens = torch.randint(0, min(vocab, 3), (batch, num_nodes), generator=generator)
    tokens[torch.rand(batch, num_nodes, generator=generator) < 0.1] = -1
    uniforms = torch.rand(batch, num_nodes, generator=generator)
    return parents, tokens, probs, uniforms


def assert_same(got, expected):
    for name, a, b in zip(("accept_len", "accept_nodes", "bonus"), got, expected):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{name}: {a} != {b}"


def test_auto_picks_cpp(monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", "auto")
    assert ops.choose_backend(torch.device("cpu"), "sample_tokens") == "cpp"


# -- against the reference ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", (1, 7, 64))
@pytest.mark.parametrize("vocab", VOCABS + (49152,))
def test_sample_tokens_matches_reference(rows, vocab):
    generator = torch.Generator().manual_seed(rows * 7 + vocab)
    probs = random_inputs(1, rows, vocab, "chain", generator)[2][0]
    uniforms = torch.rand(rows, generator=generator)
    uniforms[0] = 0.0
    uniforms[-1] = 1.0 - 2.0**-24  # the largest float32 below 1
    expected = reference.sample_tokens(probs, uniforms)
    assert torch.equal(ops.sample_tokens(probs, uniforms), expected)
    assert torch.equal(_cpp.sample_tokens(probs, uniforms), expected)


def test_sample_tokens_rounding_fallback():
    """uniform 1.0 (unchecked kernel call) puts the threshold at the total: no running sum exceeds
    it, so the last positive weight is taken, or V - 1 for a row without one."""
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    uniforms = torch.ones(3)
    assert _cpp.sample_tokens(probs, uniforms).tolist() == [2, 3, 0]
    assert reference.sample_tokens(probs, uniforms).tolist() == [2, 3, 0]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_nodes", NODE_COUNTS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("shape", ["chain", "star", "random"])
def test_matches_reference(batch, num_nodes, vocab, shape):
    generator = torch.Generator().manual_seed(batch * 100000 + num_nodes * 1000 + vocab)
    inputs = random_inputs(batch, num_nodes, vocab, shape, generator)
    expected = reference.verify_sample(*inputs)
    assert_same(ops.verify_sample(*inputs), expected)
    assert_same(cpp_verify_sample(*inputs), expected)


# -- edge cases ---------------------------------------------------------------------------------


def test_all_rejected():
    """Drafts with zero probability are never sampled: nothing is accepted, and the bonus is the
    root's token, sampled from its row."""
    generator = torch.Generator().manual_seed(3)
    parents = make_parents(2, 9, "random", generator)
    probs = torch.rand(2, 9, 6, generator=generator)
    probs[..., 4] = 0.0
    tokens = torch.full((2, 9), 4, dtype=torch.int64)
    uniforms = torch.rand(2, 9, generator=generator)
    accept_len, accept_nodes, bonus = ops.verify_sample(parents, tokens, probs, uniforms)
    assert accept_len.tolist() == [0, 0]
    assert accept_nodes[:, 0].tolist() == [0, 0] and bool((accept_nodes[:, 1:] == -1).all())
    assert torch.equal(bonus, reference.sample_tokens(probs[:, 0], uniforms[:, 0]))


def test_all_accepted_chain():
    """One-hot rows that predict the next draft: the whole chain is accepted, whatever the uniforms."""
    num_nodes, vocab = 12, 50
    drafts = torch.randint(0, vocab, (num_nodes + 1,), generator=torch.Generator().manual_seed(4))
    probs = torch.zeros(1, num_nodes, vocab)
    probs[0, torch.arange(num_nodes), drafts[1:]] = 0.7  # unnormalised one-hot
    tokens = drafts[:num_nodes].clone()[None]
    for uniform in (0.0, 0.5, 1.0 - 2.0**-24):
        uniforms = torch.full((1, num_nodes), uniform)
        parents = batch_parents([chain(num_nodes)])
        accept_len, accept_nodes, bonus = ops.verify_sample(parents, tokens, probs, uniforms)
        assert accept_len.tolist() == [num_nodes - 1]
        assert accept_nodes.tolist() == [list(range(num_nodes))]
        assert bonus.tolist() == [int(drafts[num_nodes])]


def test_single_node_is_bonus_only():
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4]], [[0.0, 0.0, 2.0, 0.0]]])
    uniforms = torch.tensor([[0.35], [0.9]])
    parents = torch.full((2, 1), -1, dtype=torch.int32)
    tokens = torch.zeros(2, 1, dtype=torch.int64)
    accept_len, accept_nodes, bonus = ops.verify_sample(parents, tokens, probs, uniforms)
    assert accept_len.tolist() == [0, 0] and accept_nodes.tolist() == [[0], [0]]
    assert bonus.tolist() == [2, 2]  # 0.35 falls in [0.3, 0.6): token 2


def test_duplicate_child_tokens():
    """Two children with the sampled token are both accepted (as in verify_greedy): the deeper
    subtree wins, equal depths go to the smaller index."""
    vocab = 4
    probs = torch.zeros(2, 5, vocab)
    probs[:, :, 1] = 1.0  # every node samples token 1
    parents = torch.tensor([[-1, 0, 0, 2, 3], [-1, 0, 0, 2, 3]], dtype=torch.int32)
    tokens = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
    uniforms = torch.full((2, 5), 0.5)
    accept_len, accept_nodes, bonus = ops.verify_sample(parents, tokens, probs, uniforms)
    assert accept_len.tolist() == [3, 1]  # row 1: node 3 (token 0) is rejected, so 1 and 2 tie
    assert accept_nodes.tolist() == [[0, 2, 3, 4, -1], [0, 1, -1, -1, -1]]
    assert bonus.tolist() == [1, 1]
    assert_same((accept_len, accept_nodes, bonus), reference.verify_sample(parents, tokens, probs, uniforms))


# -- malformed input ----------------------------------------------------------------------------


def valid_inputs():
    generator = torch.Generator().manual_seed(5)
    return list(random_inputs(3, 9, 11, "random", generator))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: a[2].__setitem__((1, 2, 3), float("nan")), "NaN or inf"),
        (lambda a: a[2].__setitem__((0, 0, 0), float("inf")), "NaN or inf"),
        (lambda a: a[2].__setitem__((2, 8, 10), -0.5), "negative"),
        (lambda a: a[2][1, 4].zero_(), "no mass"),
        (lambda a: a[1].__setitem__((0, 3), 11), r"tokens must lie in \[0, 11\)"),
        (lambda a: a[1].__setitem__((0, 3), -2), r"tokens must lie in \[0, 11\)"),
        (lambda a: a[3].__setitem__((2, 1), 1.0), r"uniforms must lie in \[0, 1\)"),
        (lambda a: a[3].__setitem__((0, 0), -0.1), r"uniforms must lie in \[0, 1\)"),
        (lambda a: a.__setitem__(3, torch.rand(3, 10)), "uniforms has shape"),
        (lambda a: a.__setitem__(2, torch.rand(3, 8, 11)), "probs has shape"),
        (lambda a: a.__setitem__(2, torch.rand(3, 9, 0)), "probs has shape"),
        (lambda a: a.__setitem__(1, torch.zeros(3, 8, dtype=torch.int64)), "tokens has shape"),
        (lambda a: a.__setitem__(2, a[2].double()), "probs has dtype"),
        (lambda a: a.__setitem__(3, a[3].half()), "uniforms has dtype"),
        (lambda a: a.__setitem__(1, a[1].int()), "tokens has dtype"),
        (lambda a: a.__setitem__(0, a[0].long()), "parents has dtype"),
        (lambda a: a[0].__setitem__((1, 4), 7), r"parents\[1, 4\] = 7 must be < 4"),
        (lambda a: a[0].__setitem__((2, 0), 0), r"parents\[2, 0\] = 0 must be -1"),
    ],
)
def test_malformed_input_raises(edit, message):
    args = valid_inputs()
    edit(args)
    with pytest.raises(ValueError, match=message):
        ops.verify_sample(*args)


SAMPLE_FAULTS = [
    (lambda p, u: p.__setitem__((1, 3), float("nan")), "NaN or inf"),
    (lambda p, u: p.__setitem__((0, 0), float("inf")), "NaN or inf"),
    (lambda p, u: p.__setitem__((2, 5), -0.5), "negative"),
    (lambda p, u: p[3].zero_(), "probs row 3 has no mass"),
    (lambda p, u: u.__setitem__(1, 1.0), r"uniforms must lie in \[0, 1\)"),
    (lambda p, u: u.__setitem__(0, float("nan")), r"uniforms must lie in \[0, 1\)"),
]


@pytest.mark.parametrize("edit, message", SAMPLE_FAULTS)
def test_sample_tokens_faults_raise_the_same_now_or_deferred(edit, message):
    """sample_tokens checks at once; sample_tokens_deferred returns the same verdict on the
    device, which raise_faults turns into the same error once the caller has read it; the
    tokens it gives beside a fault are still indices in [0, V) (nothing out of range to gather)."""
    generator = torch.Generator().manual_seed(11)
    probs, uniforms = torch.rand(5, 13, generator=generator), torch.rand(5, generator=generator)
    edit(probs, uniforms)
    with pytest.raises(ValueError, match=message):
        ops.sample_tokens(probs, uniforms)
    tokens, found = ops.sample_tokens_deferred(probs, uniforms)
    assert ((tokens >= 0) & (tokens < 13)).all()
    with pytest.raises(ValueError, match=message):
        ops.raise_faults(found.tolist())


def test_sample_tokens_deferred_on_valid_input():
    generator = torch.Generator().manual_seed(12)
    probs, uniforms = torch.rand(7, 31, generator=generator), torch.rand(7, generator=generator)
    tokens, found = ops.sample_tokens_deferred(probs, uniforms)
    assert found.tolist() == [0, 0, -1, 0]
    ops.raise_faults(found.tolist())
    assert torch.equal(tokens, reference.sample_tokens(probs, uniforms))


# -- statistics ---------------------------------------------------------------------------------

# A fixed tree over V = 4 (node: parent, token): 1: 0 -> 0, 2: 0 -> 1, 3: 1 -> 2, 4: 1 -> 0,
# 5: 2 -> 3. Node i's uniform is its depth's draw, as the decoder passes them.
STAT_PARENTS = [-1, 0, 0, 1, 1, 2]
STAT_TOKENS = [9, 0, 1, 2, 0, 3]  # the root's token is never checked
STAT_DEPTH = [0, 1, 1, 2, 2, 2]
STAT_PROBS = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25],
              [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.5, 0.0, 0.5, 0.0]]  # fmt: skip
DRAWS = 20000
DELTA = 0.5e-4  # per bound; the two bounds of a test together fail with probability < 1e-4


def tv_bound(p: torch.Tensor, n: int) -> float:
    """TV(empirical, p) <= E[TV] + t with probability >= 1 - DELTA: E[TV] <= 0.5 * sum_i
    sqrt(p_i (1 - p_i) / n) (Jensen), and TV moves by at most 1/n per draw, so McDiarmid gives
    t = sqrt(ln(1/DELTA) / (2n))."""
    return 0.5 * float((p * (1 - p) / n).sqrt().sum()) + math.sqrt(math.log(1 / DELTA) / (2 * n))


def emitted_tokens(verify, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DRAWS runs of `verify` on the fixed tree as one batch: (first token, second token or -1
    when the step emits only one, the first token's node or -1 when it is the bonus)."""
    generator = torch.Generator().manual_seed(seed)
    parents = torch.tensor([STAT_PARENTS], dtype=torch.int32).expand(DRAWS, -1).contiguous()
    tokens = torch.tensor([STAT_TOKENS]).expand(DRAWS, -1).contiguous()
    probs = torch.tensor([STAT_PROBS]).expand(DRAWS, -1, -1).contiguous()
    by_depth = torch.rand(DRAWS, max(STAT_DEPTH) + 1, generator=generator)
    uniforms = by_depth[:, STAT_DEPTH].contiguous()
    accept_len, accept_nodes, bonus = verify(parents, tokens, probs, uniforms)
    accept_len = accept_len.long()
    path_tokens = tokens.gather(1, accept_nodes.long().clamp(min=0))  # [DRAWS, T]: valid up to accept_len
    first = torch.where(accept_len >= 1, path_tokens[:, 1], bonus)
    second = torch.where(accept_len >= 2, path_tokens[:, 2], torch.where(accept_len == 1, bonus, -1))
    first_node = torch.where(accept_len >= 1, accept_nodes[:, 1].long(), -1)
    return first, second, first_node


def total_variation(samples: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=len(p)).double()
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def wrong_verify(parents, tokens, probs, uniforms):
    """Naive verification: accept child c with probability probs[node, token] (no residual, no
    renormalisation), children in order; the bonus from the node's unmodified row with a fresh
    uniform. Only for this two-level tree."""
    draws = uniforms.shape[0]
    fresh = torch.rand(draws, generator=torch.Generator().manual_seed(99))
    accept_len = torch.zeros(draws, dtype=torch.int32)
    accept_nodes = torch.full(tokens.shape, -1, dtype=torch.int32)
    accept_nodes[:, 0] = 0
    node = torch.zeros(draws, dtype=torch.long)
    undecided = torch.ones(draws, dtype=torch.bool)
    for child in range(1, tokens.shape[1]):
        at_parent = undecided & (node == parents[:, child].long())
        accept = at_parent & (uniforms[:, child] < probs[torch.arange(draws), node, tokens[:, child]])
        accept_len[accept] += 1
        accept_nodes[accept, accept_len[accept].long()] = child
        node = torch.where(accept, child, node)
    bonus = reference.sample_tokens(probs[torch.arange(draws), node], fresh)
    return accept_len, accept_nodes, bonus


def test_emitted_tokens_follow_the_target():
    """The first emitted token ~ probs[root]; given first token 0 (node 1), the second ~ probs[1]."""
    probs = torch.tensor(STAT_PROBS, dtype=torch.float64)
    first, second, first_node = emitted_tokens(cpp_verify_sample, seed=11)
    assert total_variation(first, probs[0]) <= tv_bound(probs[0], DRAWS)
    after_zero = second[first == 0]
    assert bool((first_node[first == 0] != 2).all())  # token 0 only ever comes from node 1
    assert total_variation(after_zero, probs[1]) <= tv_bound(probs[1], len(after_zero))
    assert float((first_node > 0).double().mean()) > 0.5  # the tree is actually used


def test_wrong_verifier_fails_the_bound():
    probs = torch.tensor(STAT_PROBS, dtype=torch.float64)
    first, _, _ = emitted_tokens(wrong_verify, seed=11)
    assert total_variation(first, probs[0]) > 2 * tv_bound(probs[0], DRAWS)
