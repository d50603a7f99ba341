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
    trie = drafter.propose_row(0, root_token=2)
    # "1 2" was followed by "7 8 1" and by "9 4 3": two branches under the root.
    top = children(trie, 0)
    assert set(top) >= {7, 9}
    assert list(children(trie, top[9])) == [4] and list(children(trie, top[7])) == [8]
    assert trie.keys[top[9]] == ("lookup", 2, 1)  # the more recent 2-gram match, depth 1
    assert len(trie) == len(trie.parents) == len(trie.tokens) == len(trie.keys)


def test_lookup_extends_its_index_incrementally():
    drafter = LookupDrafter(min_ngram=2, max_ngram=2, max_draft_len=2)
    drafter.start([[1, 2, 3]])
    assert len(drafter.propose_row(0, 3)) == 1  # "2 3" never seen before
    drafter.extend(0, [1, 2])
    trie = drafter.propose_row(0, 2)
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
    assert len(drafter.propose_row(0, 3)) == 1  # nothing learned yet: only the root
    tokens = torch.tensor([[3, 5, -1]])
    topk = torch.tensor([[[5, 6], [7, 8], [1, 1]]])
    outcome = StepOutcome(tokens, torch.tensor([[-1, 0, 0]], dtype=torch.int32), topk,
                          torch.tensor([1], dtype=torch.int32), torch.tensor([[0, 1, -1]], dtype=torch.int32), [0])
    drafter.observe(outcome)
    assert table.successors[3].tolist() == [5, 6] and table.successors[5].tolist() == [7, 8]
    assert (table.successors[np.arange(10) != 3][:, 0] != 1).all()  # padding rows were skipped
    trie = drafter.propose_row(0, 3)
    top = children(trie, 0)
    assert set(top) == {5, 6} and set(children(trie, top[5])) == {7, 8}
    assert trie.keys[top[6]] == ("recycling", 1, 1, None)


def test_recycling_expands_a_pool_bounded_by_the_tree_the_step_may_verify():
    """DraftRequest.max_nodes bounds the candidates (POOL_PER_NODE per node, the template's best
    paths first); None expands the whole template; auto passes the bound on to its recycling."""
    from treedec.drafters import recycling
    from treedec.drafters.base import DraftRequest

    table = RecyclingTable(vocab_size=50, width=4)
    table.successors[:] = (np.arange(50)[:, None] * 7 + np.arange(4)[None, :] + 1) % 50  # every row known
    drafter = RecyclingDrafter(table, template_nodes=60, max_depth=4)

    def sizes(request_max, d=drafter):
        return [len(t) - 1 for t in d.propose(DraftRequest(None, None, [0, 1], [3, 9], None, request_max))]

    assert sizes(None) == [60, 60]
    assert sizes(4) == [4 * recycling.POOL_PER_NODE] * 2
    assert sizes(1000) == [60, 60]
    small = drafter.propose(DraftRequest(None, None, [0], [3], None, 2))[0]
    full = drafter.propose(DraftRequest(None, None, [0], [3], None, None))[0]
    assert small.tokens == full.tokens[: len(small)]  # the template's first paths, in order
    auto = AutoDrafter(LookupDrafter(), drafter)
    auto.start([[1, 2, 3]])
    assert len(auto.propose(DraftRequest(None, None, [0], [3], None, 3))[0]) - 1 == 3 * recycling.POOL_PER_NODE


def test_recycling_couples_drafts_to_the_uniforms_when_sampling():
    """Successor probabilities remembered from a sampling step put the successor a position's
    uniform would pick (sampling order: most probable first) in slot 0; a uniform past their
    mass marks the branch "tail"; a greedy update forgets the probabilities."""
    table = RecyclingTable(vocab_size=10, width=3)
    drafter = RecyclingDrafter(table, template_nodes=12, max_depth=2)
    tokens = torch.tensor([[3, 5]])
    topk = torch.tensor([[[5, 6, 2], [7, 8, 9]]])
    probs = torch.tensor([[[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]]])
    parents = torch.tensor([[-1, 0]], dtype=torch.int32)
    accepted = (torch.tensor([1], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32))
    drafter.observe(StepOutcome(tokens, parents, topk, *accepted, [0], probs))

    def slot0(trie, node):
        return next(trie.tokens[i] for i in range(1, len(trie)) if trie.parents[i] == node and trie.keys[i][2] == 0)


    # depth 1 uses uniforms[0]: 0.65 lies in [0.5, 0.8) -> successor 6; depth 2 uses uniforms[1].
    trie = drafter.propose_row(0, 3, uniforms=[0.65, 0.61])
    assert slot0(trie, 0) == 6 and trie.keys[children(trie, 0)[6]][3] == "coupled"
    assert set(children(trie, 0)) == {5, 6, 2}  # the others stay, behind it
    five = children(trie, 0)[5]
    assert slot0(trie, five) == 8  # 0.61 in [0.6, 0.8) under token 5 ...
    second = next(i for i in range(1, len(trie)) if trie.parents[i] == five and trie.keys[i][2] == 1)
    assert trie.tokens[second] == 7  # ... next to 0.6, the edge with token 7's slice: 7 is tried second
    assert trie.keys[second][3] == "coupled-edge"
    trie = drafter.propose_row(0, 3, uniforms=[0.95])  # past 0.9: no successor is likely
    assert slot0(trie, 0) == 5 and trie.keys[children(trie, 0)[5]][3] == "tail"
    below = children(trie, children(trie, 0)[5])
    assert below and all(trie.keys[i][3] is None for i in below.values())  # no uniform given for depth 2

    greedy = StepOutcome(tokens[:, :1], parents[:, :1], topk[:, :1], torch.tensor([0], dtype=torch.int32),
                         torch.tensor([[0]], dtype=torch.int32), [0])
    drafter.observe(greedy)
    trie = drafter.propose_row(0, 3, uniforms=[0.65])
    assert slot0(trie, 0) == 5 and trie.keys[children(trie, 0)[5]][3] is None


def test_auto_puts_lookup_first_and_recycling_fills_in():
    tables = {}
    drafter = make_drafter("auto", {"recycling_width": 2}, vocab_size=20, tables=tables)
    assert isinstance(drafter, AutoDrafter) and ("recycling", 2) in tables
    tables[("recycling", 2)].successors[4] = [9, 11]
    drafter.start([[1, 4, 9, 2, 1, 4]])
    trie = drafter.propose_row(0, 4)
    top = children(trie, 0)
    assert trie.keys[top[9]][0] == "lookup"  # lookup's node keeps its key where recycling agrees
    assert trie.keys[top[11]][0] == "recycling"
    # The table persists: a new drafter for the same model sees what the old one learned.
    again = make_drafter("recycling", {"recycling_width": 2}, vocab_size=20, tables=tables)
    assert again.table is tables[("recycling", 2)]


def test_auto_labels_lookup_drafts_by_the_tables_coupled_guess():
    drafter = make_drafter("auto", {"recycling_width": 2}, vocab_size=20, tables={})
    drafter.recycling.table.successors[4] = [9, 11]
    drafter.recycling.table.probs[4] = [0.7, 0.2]
    drafter.start([[1, 4, 9, 2, 1, 4]])  # lookup drafts 9 after 4, then 2 (the table knows nothing after 9)
    lookup_labels = {}
    for uniforms in ([0.3, 0.5], [0.8, 0.5], [0.95, 0.5], None):
        trie = drafter.propose_row(0, 4, uniforms=uniforms)
        nine = children(trie, 0)[9]
        lookup_labels[None if uniforms is None else uniforms[0]] = trie.keys[nine]
        if uniforms is not None:  # nothing remembered after 9: labelled "cannot tell"
            assert trie.keys[children(trie, nine)[2]][-1] is None
    assert lookup_labels[0.3][-1] == "agree"  # 0.3 < 0.7 picks 9, lookup's draft
    assert lookup_labels[0.8][-1] == "disagree"  # 0.8 picks 11
    assert lookup_labels[0.95][-1] == "tail"
    assert lookup_labels[None][0] == "lookup" and len(lookup_labels[None]) == 3  # greedy: unlabelled
