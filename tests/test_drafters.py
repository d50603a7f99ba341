"""Drafters on hand-made histories: what candidates they propose and what they learn."""

import numpy as np
import pytest
import torch

from treedec.drafters import AutoDrafter, LookupDrafter, RecyclingDrafter, RecyclingTable, StepOutcome, make_drafter
from treedec.drafters.recycling import rank_template


def children(trie, node):
    return {trie.tokens[i]: i for i, p in enumerate(trie.parents) if p == node}


def test_lookup_merges_several_matches_into_one_tree():
    drafter = LookupDrafter(min_ngram=1, max_ngram=3, max_matches=4, max_draft_len=3)
    #            0  1  2  3  4  5  6  7  8  9 10 11
    history = [5, 1, 2, 7, 8, 1, 2, 9, 4, 3, 1, 2]
    drafter.start([history])
    trie = drafter.propose(0, root_token=2)
    # "1 2" was followed by "7 8 1" and by "9 4 3": two branches under the root.
    top = children(trie, 0)
    assert set(top) >= {7, 9}
    assert list(children(trie, top[9])) == [4] and list(children(trie, top[7])) == [8]
    assert trie.keys[top[9]] == ("lookup", 2, 1)  # the more recent 2-gram match, depth 1
    assert len(trie) == len(trie.parents) == len(trie.tokens) == len(trie.keys)


def test_lookup_extends_its_index_incrementally():
    drafter = LookupDrafter(min_ngram=2, max_ngram=2, max_draft_len=2)
    drafter.start([[1, 2, 3]])
    assert len(drafter.propose(0, 3)) == 1  # "2 3" never seen before
    drafter.extend(0, [1, 2])
    trie = drafter.propose(0, 2)
    assert children(trie, 0) == {3: 1} and children(trie, 1) == {1: 2}


def test_lookup_rejects_bad_options():
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        LookupDrafter(min_ngram=3, max_ngram=2)


def test_rank_template_is_parent_closed_and_widest_at_the_top():
    template = rank_template(20, width=4, max_depth=4)
    assert len(template) == 20 and len(set(template)) == 20
    assert all(path[:-1] in set(template) | {()} for path in template)
    assert template[0] == (0,) and sum(len(p) == 1 for p in template) == 4


def test_recycling_learns_successors_and_expands_them():
    table = RecyclingTable(vocab_size=10, width=2)
    drafter = RecyclingDrafter(table, template_nodes=6, max_depth=3)
    assert len(drafter.propose(0, 3)) == 1  # nothing learned yet: only the root
    tokens = torch.tensor([[3, 5, -1]])
    topk = torch.tensor([[[5, 6], [7, 8], [1, 1]]])
    outcome = StepOutcome(tokens, torch.tensor([[-1, 0, 0]], dtype=torch.int32), topk,
                          torch.tensor([1], dtype=torch.int32), torch.tensor([[0, 1, -1]], dtype=torch.int32), [0])
    drafter.observe(outcome)
    assert table.successors[3].tolist() == [5, 6] and table.successors[5].tolist() == [7, 8]
    assert (table.successors[np.arange(10) != 3][:, 0] != 1).all()  # padding rows were skipped
    trie = drafter.propose(0, 3)
    top = children(trie, 0)
    assert set(top) == {5, 6} and set(children(trie, top[5])) == {7, 8}
    assert trie.keys[top[6]] == ("recycling", 1, 1)


def test_auto_puts_lookup_first_and_recycling_fills_in():
    tables = {}
    drafter = make_drafter("auto", {"recycling_width": 2}, vocab_size=20, tables=tables)
    assert isinstance(drafter, AutoDrafter) and ("recycling", 2) in tables
    tables[("recycling", 2)].successors[4] = [9, 11]
    drafter.start([[1, 4, 9, 2, 1, 4]])
    trie = drafter.propose(0, 4)
    top = children(trie, 0)
    assert trie.keys[top[9]][0] == "lookup"  # lookup's node keeps its key where recycling agrees
    assert trie.keys[top[11]][0] == "recycling"
    # The table persists: a new drafter for the same model sees what the old one learned.
    again = make_drafter("recycling", {"recycling_width": 2}, vocab_size=20, tables=tables)
    assert again.table is tables[("recycling", 2)]
