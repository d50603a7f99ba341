import random

import pytest
import torch

from helpers import batch_parents, chain, random_parents, star
from trees import Tree
from treedec.ops import build_tree
from treedec.reference.tree import pack_bits, unpack_bits
from trees import chain_parents, parents_from_choices


def ancestors_by_walking(parents: list[int]) -> list[set[int]]:
    out = []
    for i in range(len(parents)):
        seen, node = set(), i
        while node >= 0:
            seen.add(node)
            node = parents[node]
        out.append(seen)
    return out


@pytest.mark.parametrize("num_nodes", [1, 2, 7, 31, 32, 33, 64, 100])
def test_packed_mask_and_depth_match_walking_the_tree(num_nodes):
    rng = random.Random(num_nodes)
    rows = [random_parents(num_nodes, rng), chain(num_nodes), star(num_nodes)]
    depth, mask = build_tree(batch_parents(rows))
    assert mask.shape == (3, num_nodes, (num_nodes + 31) // 32) and mask.dtype == torch.int32
    for b, parents in enumerate(rows):
        for i, anc in enumerate(ancestors_by_walking(parents)):
            assert depth[b, i] == len(anc) - 1
            for j in range(num_nodes):
                word, bit = divmod(j, 32)
                assert bool((int(mask[b, i, word]) >> bit) & 1) == (j in anc), (b, i, j)


def test_bit_31_is_the_sign_bit():
    bits = torch.zeros(1, 33, dtype=torch.bool)
    bits[0, 31] = True
    packed = pack_bits(bits)
    assert packed.tolist() == [[-(2**31), 0]]
    assert torch.equal(unpack_bits(packed, 33), bits)


def test_positions_add_depth_to_prefix():
    tree = Tree.from_parents([-1, 0, 0, 1], [5, 6, 7, 8], batch_size=2)
    assert tree.positions(torch.tensor([10, 3])).tolist() == [[10, 11, 11, 12], [3, 4, 4, 5]]
    assert tree.paths()[0] == [[0], [0, 1], [0, 2], [0, 1, 3]]


def test_medusa_choices_converter():
    parents, paths = parents_from_choices([[1], [0], [0, 0], [0, 1], [0, 0, 0]])
    assert paths == [(), (0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert parents == [-1, 0, 0, 1, 1, 3]
    with pytest.raises(ValueError, match="no parent choice"):
        parents_from_choices([[0, 1]])
    assert chain_parents(4) == [-1, 0, 1, 2]


@pytest.mark.parametrize(
    "row, message",
    [
        ([0, 0, 1], r"parents\[0, 0\] = 0 must be -1"),
        ([-1, 1, 0], r"parents\[0, 1\] = 1 must be < 1"),
        ([-1, 0, 5], r"parents\[0, 2\] = 5 must be < 2"),
        ([-1, 0, -3], r"parents\[0, 2\] = -3 must be >= 0"),
    ],
)
def test_malformed_trees_raise(row, message):
    with pytest.raises(ValueError, match=message):
        build_tree(batch_parents([row]))
    with pytest.raises(ValueError, match=message):
        Tree(batch_parents([row]), torch.zeros(1, 3, dtype=torch.int64))


def test_tree_rejects_bad_tokens_and_dtypes():
    with pytest.raises(ValueError, match="must be >= 0, or -1"):
        Tree.from_parents([-1, 0], [3, -2])
    with pytest.raises(ValueError, match="integer dtype"):
        Tree(batch_parents([[-1, 0]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="dtype int64"):
        build_tree(torch.tensor([[-1, 0]], dtype=torch.int64))
