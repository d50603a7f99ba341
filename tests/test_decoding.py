"""Lossless end to end on tiny random Llamas: treedec's output equals unpatched HF greedy."""

import time

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import treedec
from helpers import OracleDrafter
from treedec.drafters.base import DraftTrie
from treedec.tools.models import tiny_llama
from treedec.tools.prompts import left_pad

DRAFTERS = [None, "lookup", "recycling", "auto"]


left_padded = left_pad  # the name the other test modules import from here


def repetitive_prompt(seed: int, length: int) -> list[int]:
    """Prompts with repeats, so lookup finds matches and trees get accepted paths."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, 96, (6,), generator=g).tolist()
    return (motif * (length // 6 + 1))[:length]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_batch_of_one(seed, drafter):
    model = tiny_llama(seed=seed)
    ids = torch.tensor([repetitive_prompt(seed, 14)])
    expected = model.generate(ids, max_new_tokens=40, do_sample=False)
    treedec.patch(model, drafter=drafter)
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(out, expected)
    stats, new = model.treedec.last_stats, out.shape[1] - ids.shape[1]
    # the prefill emits the first token (as HF's does); each loop step at least one more
    assert stats["new_tokens"] == new and stats["steps"] <= new - 1 and stats["tau"] == new / (stats["steps"] + 1)
    if drafter is None:
        assert stats["steps"] == new - 1 and stats["tau"] == 1.0


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_batch_of_three_with_different_prompt_lengths(seed, drafter):
    model = tiny_llama(seed=seed)
    ids, mask = left_padded([repetitive_prompt(seed, 5), repetitive_prompt(seed + 1, 17), [7]])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    treedec.patch(model, drafter=drafter)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False), expected)


@pytest.mark.parametrize("drafter", ["auto", None])
def test_batch_of_four_equals_each_alone(drafter):
    model = treedec.patch(tiny_llama(seed=4), drafter=drafter)
    prompts = [repetitive_prompt(s, n) for s, n in [(1, 4), (2, 11), (3, 8), (4, 20)]]
    ids, mask = left_padded(prompts)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False)
    for b, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=25, do_sample=False)
        assert batch[b, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist()


def greedy_continuation(model, ids, mask, new):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
    return out[:, ids.shape[1] :].tolist()


def test_eos_inside_an_accepted_path_stops_each_sequence_at_its_own_eos(flat_step_costs):
    model = tiny_llama(seed=5)
    ids, mask = left_padded([repetitive_prompt(5, 9), repetitive_prompt(6, 13), repetitive_prompt(7, 6)])
    continuations = greedy_continuation(model, ids, mask, 40)
    eos = continuations[1][6]  # a token that appears mid-chunk for sequence 1, maybe elsewhere too
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    oracle = OracleDrafter(continuations, depth=10)
    treedec.patch(model, drafter=oracle)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    assert torch.equal(got, expected)
    assert model.treedec.last_stats["tau"] > 2  # the oracle's chunks really were multi-token
    # The list form of eos_token_id works too.
    got = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=[eos, 95],
                         pad_token_id=0)
    assert torch.equal(got, model.treedec.original_generate(ids, attention_mask=mask, max_new_tokens=40,
                                                            do_sample=False, eos_token_id=[eos, 95], pad_token_id=0))


@pytest.mark.parametrize("max_new_tokens", [1, 3, 7])
def test_max_new_tokens_smaller_than_an_accepted_chunk(max_new_tokens, flat_step_costs):
    model = tiny_llama(seed=6)
    ids = torch.tensor([repetitive_prompt(8, 10)])
    continuations = greedy_continuation(model, ids, None, 30)
    expected = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    treedec.patch(model, drafter=OracleDrafter(continuations, depth=12))
    got = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    assert torch.equal(got, expected) and got.shape[1] == 10 + max_new_tokens


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_the_prefill_emits_the_first_token(drafter, monkeypatch):
    """The prompt's last token goes through the model with the rest of the prompt, so the first
    token comes from the prefill, as HF's does: a one-token call runs no step and asks for no
    drafts, on a left-padded batch with a one-token prompt."""
    from treedec.decoding import TreeDecoder

    proposals = []
    propose = TreeDecoder._propose
    monkeypatch.setattr(TreeDecoder, "_propose", lambda self, *a: proposals.append(a) or propose(self, *a))
    model = tiny_llama(seed=9)
    ids, mask = left_padded([repetitive_prompt(11, 10), repetitive_prompt(12, 4), [7]])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    treedec.patch(model, drafter=drafter)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False), expected)
    stats = model.treedec.last_stats
    assert stats["steps"] == 0 and stats["new_tokens"] == 3 and stats["tau"] == 1.0 and not proposals
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert model.treedec.last_stats["steps"] == 1


def test_a_first_token_that_is_eos_ends_its_row_at_the_prefill(flat_step_costs):
    """One row's first token is its EOS: that row leaves the batch after the prefill, the others
    go on, and the output is HF's (the EOS id appears in other rows' continuations too)."""
    model = tiny_llama(seed=10)
    ids, mask = left_padded([repetitive_prompt(13, 9), repetitive_prompt(14, 12), repetitive_prompt(15, 5)])
    continuations = greedy_continuation(model, ids, mask, 30)
    eos = continuations[1][0]
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    assert expected[1, ids.shape[1]:].tolist() == [eos] + [0] * 29  # the case under test
    assert (expected[:, ids.shape[1]:] != 0).sum() > 3  # other rows went on
    treedec.patch(model, drafter=OracleDrafter(continuations, depth=6))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    assert torch.equal(got, expected)


def test_streamer_chunks_concatenate_to_the_output(flat_step_costs):
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    model = tiny_llama(seed=7)
    ids = torch.tensor([repetitive_prompt(9, 12)])
    continuations = greedy_continuation(model, ids, None, 30)
    treedec.patch(model, drafter=OracleDrafter(continuations, depth=6))
    streamer = Collect()
    out = model.generate(ids, max_new_tokens=30, do_sample=False, streamer=streamer)
    assert streamer.puts[0] == ids[0].tolist() and streamer.ended
    assert sum(streamer.puts[1:], []) == out[0, 12:].tolist()
    assert max(len(chunk) for chunk in streamer.puts[1:]) > 1  # chunks, not single tokens


def test_stopping_criteria_are_honoured_per_token(flat_step_costs):
    class StopAfterToken(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    model = tiny_llama(seed=8)
    ids = torch.tensor([repetitive_prompt(10, 12)])
    continuations = greedy_continuation(model, ids, None, 30)
    stop = StoppingCriteriaList([StopAfterToken(continuations[0][9])])
    expected = model.generate(ids, max_new_tokens=30, do_sample=False, stopping_criteria=stop)
    treedec.patch(model, drafter=OracleDrafter(continuations, depth=12))
    assert torch.equal(model.generate(ids, max_new_tokens=30, do_sample=False, stopping_criteria=stop), expected)


def test_max_length_default_is_honoured_like_hf():
    model = tiny_llama(seed=9)
    ids = torch.tensor([repetitive_prompt(11, 8)])
    expected = model.generate(ids, max_length=15, do_sample=False)
    treedec.patch(model, drafter="auto")
    assert torch.equal(model.generate(ids, max_length=15, do_sample=False), expected)


def test_tree_size_follows_acceptance():
    """A drafter whose guesses are always wrong is priced out: the loop ends up decoding plainly.

    The tiny model's step time hardly depends on T (it is all overhead), so the test gives the
    loop the cost curve of a real model (a 16-node verify at 1.5x a 1-node step) and freezes it.
    """
    from treedec.drafters.base import DraftTrie, RowDrafter
    from treedec.sizing import CostCurve

    class AlwaysWrong(RowDrafter):
        name = "wrong"

        def propose_row(self, seq, root_token, uniforms=None):
            trie = DraftTrie(root_token)
            for rank in range(4):
                trie.child(0, 95 - rank, ("wrong", rank))
            return trie

    model = treedec.patch(tiny_llama(seed=10), drafter=AlwaysWrong())
    cost = CostCurve()
    for size, seconds in {1: 1.0, 2: 1.05, 4: 1.1, 8: 1.25, 16: 1.5, 32: 2.0}.items():
        cost.record(1, size, seconds)
    cost.record = lambda *args: None
    model.treedec.learned.cost = cost
    ids = torch.tensor([repetitive_prompt(12, 8)])
    model.generate(ids, max_new_tokens=40, do_sample=False)
    first = model.treedec.last_stats["mean_tree_nodes"]
    assert first > 1.5  # drafts were tried at first ...
    for _ in range(2):
        model.generate(ids, max_new_tokens=40, do_sample=False)
    # ... then priced out, but for a rare exploratory step as old evidence fades.
    assert model.treedec.last_stats["mean_tree_nodes"] < min(first, 1.5)
    assert all(rate < 0.1 for rate in model.treedec.learned.acceptance.snapshot().values())


def test_trees_grow_as_real_steps_measure_them_with_nothing_timed_apart(monkeypatch):
    """No calibration: every verify is a decoding step, and the sizer's largest tree is at most
    twice the largest work a step has measured, so the curve reaches big trees a doubling a step."""
    from treedec import decoding

    verifies = []
    original = decoding.TreeDecoder._verify_step

    def counting(self, cache, parents, tokens, *args, **kwargs):
        verifies.append(tokens.numel())
        return original(self, cache, parents, tokens, *args, **kwargs)

    monkeypatch.setattr(decoding.TreeDecoder, "_verify_step", counting)
    model = tiny_llama(seed=5)
    ids = torch.tensor([repetitive_prompt(5, 30)])
    expected = model.generate(ids, max_new_tokens=40, do_sample=False)
    treedec.patch(model, drafter="lookup")
    assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False), expected)
    assert len(verifies) == model.treedec.last_stats["steps"]  # nothing but decoding steps
    measured = 0
    for work in verifies:  # each tree at most twice the largest work measured before it
        assert work <= max(2 * measured, 1)
        measured = max(measured, work)
    assert max(verifies) >= 2  # and they grew (lookup drafts up to 3 nodes here)


def test_rows_finishing_one_by_one_are_priced_from_the_curve_the_batch_measured():
    """One curve keyed by batch x T: the batch's steps measured the work its shrinking rows need."""
    model = treedec.patch(tiny_llama(seed=5), drafter="auto")
    noise = torch.Generator().manual_seed(0)
    prompts = [repetitive_prompt(s, 18) for s in range(5)] + [
        torch.randint(3, 96, (9,), generator=noise).tolist() for _ in range(5)
    ]
    ids, mask = left_padded(prompts)
    expected = model.treedec.original_generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False), expected)
    cost = model.treedec.learned.cost
    assert max(cost.seconds) >= 10  # the whole batch's one-node step, at least
    assert cost.covers(1) and cost.explored_nodes(1) >= 20  # one row may draft from the first step


class SlowWrongDrafter(OracleDrafter):
    """Drafts only wrong tokens, slowly: drafting never pays."""

    def propose_row(self, seq, root_token, uniforms=None):
        time.sleep(0.004)
        trie = DraftTrie(root_token)
        trie.child(0, (root_token + 1) % self.vocab_size, ("wrong", 1))
        return trie


def test_steps_stop_drafting_while_drafts_do_not_pay():
    """sizing.DraftGate: drafted steps that cost more per token than plain ones turn drafting off
    for a while (plain steps), and the output stays HF's."""
    model = tiny_llama(seed=5)
    ids, mask = left_padded([repetitive_prompt(5, 9), repetitive_prompt(6, 13)])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False)
    treedec.patch(model, drafter=SlowWrongDrafter([[], []]))
    treedec.patching.learned_state(model).gate(model.treedec.drafter, sampling=False).min_batch = 1  # gate B = 2
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False), expected)
    assert model.treedec.last_stats["plain_steps"] > 0
    assert treedec.patching.learned_state(model).gate(model.treedec.drafter, sampling=False).closings > 0


def test_drafts_that_pay_keep_the_gate_open(flat_step_costs):
    model = tiny_llama(seed=5)
    ids, mask = left_padded([repetitive_prompt(5, 9), repetitive_prompt(6, 13)])
    continuations = greedy_continuation(model, ids, mask, 60)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False)
    treedec.patch(model, drafter=OracleDrafter(continuations, depth=8))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False), expected)
    assert model.treedec.last_stats["plain_steps"] == 0 and model.treedec.last_stats["tau"] > 3
