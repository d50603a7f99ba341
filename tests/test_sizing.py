"""Tree sizing: acceptance estimates, the cost curve, and the choice between them."""

import pytest

from treedec.drafters.base import DraftTrie
from treedec.sizing import AcceptanceModel, CostCurve, DraftGate, batch_bucket, choose, monotone, path_probabilities


def curve(points: dict[int, float], batch: int = 1) -> CostCurve:
    cost = CostCurve()
    for size, seconds in points.items():
        cost.record(batch, size, seconds)
    return cost


def chain_trie(length: int, key="k") -> DraftTrie:
    trie = DraftTrie(0)
    node = 0
    for depth in range(1, length + 1):
        node = trie.child(node, depth, (key, depth))
    return trie


def trained(rate: float, keys, trials: int = 400) -> AcceptanceModel:
    model = AcceptanceModel()
    for i in range(trials):
        for key in keys:
            model.update(key, (i % 100) < rate * 100)
    return model


def test_monotone_pools_violators():
    assert monotone([(1, 1.0), (2, 3.0), (4, 1.0), (8, 4.0)]) == [(1, 1.0), (2, 2.0), (4, 2.0), (8, 4.0)]


def test_cost_interpolates_and_drops_outliers():
    cost = curve({1: 1.0, 4: 1.3, 16: 2.5})
    assert cost.cost(1, 2) == pytest.approx(1.1)
    assert cost.cost(1, 32) == pytest.approx(4.1)  # extrapolated from the last two points
    cost.record(1, 4, 50.0)  # a GC pause: ignored
    assert cost.cost(1, 4) == pytest.approx(1.3)


def test_cost_is_keyed_by_work_across_batch_sizes():
    cost = curve({1: 1.0, 2: 1.2, 4: 1.6}, batch=4)  # works 4, 8, 16
    assert cost.cost(2, 4) == pytest.approx(1.2)  # 2 rows x 4 nodes: the work of 4 rows x 2 nodes
    assert cost.cost(3, 2) == pytest.approx(1.1)  # work 6, between 4 and 8
    assert cost.cost(1, 2) == pytest.approx(0.9)  # work 2: extrapolated down from the first two points ...
    assert cost.cost(1, 1) == pytest.approx(0.85)
    assert curve({1: 1.0, 2: 2.0}, batch=4).cost(1, 1) == pytest.approx(0.5)  # ... to half the smallest, no less


def test_cost_covers_batches_up_to_twice_the_measured_work():
    cost = curve({1: 1.0, 2: 1.2}, batch=8)  # works 8 and 16
    assert [b for b in range(1, 40) if cost.covers(b)] == list(range(1, 33))
    assert not CostCurve().covers(1)


def test_explored_nodes_is_twice_the_largest_measured_work():
    assert CostCurve().explored_nodes(4) == 1  # nothing measured: no drafts, the step measures T = 1
    cost = curve({1: 1.0, 2: 1.2}, batch=8)  # works 8 and 16
    assert [cost.explored_nodes(b) for b in (1, 2, 8, 16, 32, 64)] == [32, 16, 4, 2, 1, 1]
    one = CostCurve()
    one.record(1, 1, 0.5)
    assert one.explored_nodes(1) == 2 and one.cost(1, 2) == 0.5  # one point: priced flat, so tried


def test_acceptance_converges_and_forgets_toward_prior():
    model = trained(0.8, ["a"])
    assert model.rate("a") == pytest.approx(0.8, abs=0.05)
    for _ in range(2000):
        model.next_step()
    assert abs(model.rate("a") - model.prior) < 0.1


def test_path_probability_is_product_along_the_path():
    model = trained(0.5, [("k", 1), ("k", 2)])
    probs = path_probabilities(chain_trie(2), model)
    assert probs[1] == pytest.approx(model.rate(("k", 1)))
    assert probs[2] == pytest.approx(probs[1] * model.rate(("k", 2)))


def test_choose_no_drafts_when_they_do_not_pay():
    keys = [("k", d) for d in range(1, 9)]
    cost = curve({1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5, 16: 2.0, 32: 3.0})
    size, kept, expected = choose([chain_trie(8)], trained(0.02, keys), cost, max_nodes=32)
    assert size == 1 and kept == [[0]] and expected == pytest.approx(1.0)


def test_choose_grows_the_tree_when_acceptance_is_high():
    keys = [("k", d) for d in range(1, 9)]
    cost = curve({1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2, 16: 2.0, 32: 3.0})
    size, kept, expected = choose([chain_trie(8)], trained(0.95, keys), cost, max_nodes=32)
    assert size == 8 and kept == [list(range(8))] and expected > 5


def test_choose_keeps_best_nodes_and_their_parents():
    trie = DraftTrie(0)
    good = trie.child(0, 1, "good")
    trie.child(0, 2, "bad")
    trie.child(good, 3, "good")
    model = AcceptanceModel()
    for _ in range(200):
        model.update("good", True)
        model.update("bad", False)
    size, kept, _ = choose([trie], model, curve({1: 1.0, 3: 1.0, 4: 1.5}), max_nodes=8)
    assert size == 3 and kept == [[0, 1, 3]]


def test_cost_above_the_measured_work_grows_at_least_at_the_mean_slope():
    cost = curve({1: 1.0, 2: 2.0, 4: 2.05})  # a noisy, nearly flat top pair
    assert cost.cost(1, 12) == pytest.approx(2.05 + 8 * (2.05 - 1.0) / 3)


def test_samples_past_the_measured_work_are_kept_however_slow():
    """An outlier is judged against measured points only: a step far past them, however much slower
    than the extrapolation guessed, is what corrects the extrapolation."""
    cost = curve({1: 1.0, 2: 1.1, 4: 1.2})
    cost.record(1, 64, 40.0)  # the extrapolation said 5.2
    assert cost.cost(1, 64) == pytest.approx(40.0)
    cost.record(1, 2, 50.0)  # within the measured work: a GC pause, dropped
    assert cost.cost(1, 2) == pytest.approx(1.1)


def test_draft_gate_closes_while_drafted_steps_lose_and_backs_off():
    gate = DraftGate(margin=0.03, evidence=3, first_backoff=4, max_backoff=8, min_batch=1)
    for _ in range(2):  # 0.5 s a token against a plain 0.1 s a row: losing, but too little evidence
        gate.record(4, seconds=2.0, tokens=4, plain_seconds=0.4)
        assert gate.opens(4)
    gate.record(4, seconds=2.0, tokens=4, plain_seconds=0.4)
    assert not gate.opens(3)  # 3 rows share 4's bucket (3-4): the first of its 4 plain steps
    assert [gate.opens(4) for _ in range(4)] == [False] * 3 + [True]  # then drafting again
    assert gate.opens(8)  # another bucket (5-8) keeps its own verdict
    for _ in range(3):  # losing again, on fresh evidence: twice as long
        gate.record(4, seconds=2.0, tokens=4, plain_seconds=0.4)
    assert [gate.opens(4) for _ in range(9)] == [False] * 8 + [True]
    for _ in range(3):  # winning: 0.05 s a token, and the backoff starts over
        gate.record(4, seconds=0.4, tokens=8, plain_seconds=0.4)
    assert gate.opens(4) and gate.backoff[batch_bucket(4)] == 4 and gate.closings == 2


def test_draft_gate_needs_a_plain_step_to_compare_with():
    gate = DraftGate(evidence=1, min_batch=1)
    for _ in range(5):
        gate.record(2, seconds=9.0, tokens=2, plain_seconds=None)
        assert gate.opens(2)
    even = DraftGate(evidence=1, min_batch=1)
    even.record(2, seconds=0.2, tokens=2, plain_seconds=0.2)  # as fast as a plain step: within the margin
    assert even.opens(2) and even.closings == 0
