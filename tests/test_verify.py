import random

import pytest
import torch

from helpers import batch_parents, chain, random_parents, star
from treedec.ops import verify_greedy


def verify_by_hand(parents, tokens, target):
    """Walk every root path; keep the deepest fully matching one (smallest index on ties)."""
    best_node, best_depth = 0, 0
    for node in range(1, len(parents)):
        path, cur = [], node
        while cur > 0:
            path.append(cur)
            cur = parents[cur]
        path.reverse()
        ok = all(tokens[n] >= 0 and tokens[n] == target[parents[n]] for n in path)
        if ok and len(path) > best_depth:
            best_node, best_depth = node, len(path)
    path, cur = [], best_node
    while cur >= 0:
        path.append(cur)
        cur = parents[cur]
    return best_depth, path[::-1], target[best_node]


def run(rows, tokens, target):
    return verify_greedy(batch_parents(rows), torch.tensor(tokens), torch.tensor(target))


def test_chain_all_accepted_and_all_rejected():
    accept_len, nodes, bonus = run([chain(4), chain(4)], [[9, 1, 2, 3], [9, 5, 2, 3]], [[1, 2, 3, 4], [1, 2, 3, 4]])
    assert accept_len.tolist() == [3, 0]
    assert nodes.tolist() == [[0, 1, 2, 3], [0, -1, -1, -1]]
    assert bonus.tolist() == [4, 1]
    assert accept_len.dtype == torch.int32 and nodes.dtype == torch.int32 and bonus.dtype == torch.int64


def test_star_and_ties_go_to_smallest_index():
    # nodes 1 and 2 both match target[0]? distinct tokens cannot both match; use depth ties instead:
    parents = [-1, 0, 0, 1, 2]
    tokens = [[9, 4, 5, 6, 7]]
    target = [[4, 6, 6, 0, 0]]  # node1 (4) accepted, node3 (6 == target[1]) accepted; node2 rejected
    accept_len, nodes, bonus = run([parents], tokens, target)
    assert accept_len.tolist() == [2] and nodes[0, :3].tolist() == [0, 1, 3] and bonus.tolist() == [0]
    # Two equally deep accepted leaves can only arise under different parents: smallest index wins.
    accept_len, nodes, _ = run([star(3)], [[9, 4, 4]], [[4, 0, 0]])
    assert accept_len.tolist() == [1] and nodes[0, :2].tolist() == [0, 1]


def test_single_node_and_padding_nodes():
    accept_len, nodes, bonus = run([[-1]], [[7]], [[3]])
    assert accept_len.tolist() == [0] and nodes.tolist() == [[0]] and bonus.tolist() == [3]
    # A padding node (-1) is never accepted even where target would be -1.
    accept_len, _, _ = run([chain(3)], [[7, -1, 2]], [[-1, 2, 5]])
    assert accept_len.tolist() == [0]


@pytest.mark.parametrize("num_nodes", [1, 2, 7, 31, 33, 64])
def test_random_trees_match_walking_every_path(num_nodes):
    rng = random.Random(num_nodes)
    rows, tokens, target = [], [], []
    for _ in range(5):
        rows.append(random_parents(num_nodes, rng))
        target.append([rng.randrange(4) for _ in range(num_nodes)])
        tokens.append([rng.choice([-1, 0, 1, 2, 3]) for _ in range(num_nodes)])
    accept_len, nodes, bonus = run(rows, tokens, target)
    for b in range(5):
        depth, path, expected_bonus = verify_by_hand(rows[b], tokens[b], target[b])
        assert int(accept_len[b]) == depth
        assert nodes[b, : depth + 1].tolist() == path and (nodes[b, depth + 1 :] == -1).all()
        assert int(bonus[b]) == expected_bonus


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tokens has shape"):
        run([chain(3)], [[1, 2]], [[1, 2, 3]])
    with pytest.raises(ValueError, match="must be < 1"):
        run([[-1, 1, 0]], [[1, 2, 3]], [[1, 2, 3]])
    with pytest.raises(ValueError, match="dtype"):
        verify_greedy(batch_parents([chain(2)]), torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 2]]))
