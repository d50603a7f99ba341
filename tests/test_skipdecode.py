"""SkipDecode (lossy early exit): its schedule never increases, it is exact where the skipped
layers do nothing, and it never reads KV a token did not write."""

import pytest
import torch

from test_decoding import left_padded, repetitive_prompt
from test_layerskip import peaked
from treedec.tools import skipdecode
from treedec.tools.models import tiny_llama


@pytest.mark.parametrize("new,layers,first,last", [(1, 4, None, None), (2, 4, 4, 1), (7, 30, 30, 18), (64, 30, 30, 24),
                                                   (5, 6, 3, 3), (100, 2, 2, 1)])
def test_exit_schedule_never_increases_and_stays_in_range(new, layers, first, last):
    schedule = skipdecode.exit_schedule(new, layers, first, last)
    assert len(schedule) == new
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))
    top = layers if first is None else first
    bottom = max(1, layers // 2) if last is None else last
    assert schedule[0] == top and schedule[-1] == (bottom if new > 1 else top)
    assert all(bottom <= e <= top for e in schedule)


@pytest.mark.parametrize("args", [(0, 4, None, None), (5, 4, 2, 3), (5, 4, 5, 1), (5, 4, 2, 0)])
def test_bad_schedules_raise(args):
    with pytest.raises(ValueError):
        skipdecode.exit_schedule(*args)


def test_all_layers_equals_greedy_for_a_left_padded_batch():
    model = tiny_llama(seed=1, num_layers=3)
    ids, mask = left_padded([repetitive_prompt(0, 9), repetitive_prompt(1, 4), [7, 8, 9, 10, 11, 12]])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    out = skipdecode.generate(model, ids, mask, max_new_tokens=12, first_exit=3, last_exit=3)
    assert torch.equal(out.sequences, expected) and out.exit_layers == [3] * 12


def test_exact_when_the_skipped_layers_add_nothing():
    """Layers 3..5 are idle: exiting at 3 computes what the full model computes, so any schedule
    down to 3 must give greedy's tokens."""
    model = peaked(seed=2, num_layers=6, idle_layers=(3, 4, 5))
    ids, mask = left_padded([repetitive_prompt(2, 10), repetitive_prompt(3, 15)])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = skipdecode.generate(model, ids, mask, max_new_tokens=20, first_exit=6, last_exit=3)
    assert out.exit_layers[0] == 6 and out.exit_layers[-1] == 3
    assert torch.equal(out.sequences, expected)


def test_lossy_when_needed_layers_are_skipped_and_eos_pads():
    model = peaked(seed=2, num_layers=4)
    ids = torch.tensor([repetitive_prompt(2, 10)])
    full = model.generate(ids, max_new_tokens=16, do_sample=False)
    out = skipdecode.generate(model, ids, None, max_new_tokens=16, first_exit=2, last_exit=1)
    assert not torch.equal(out.sequences, full)  # the label says lossy; this model shows it
    eos = int(out.sequences[0, ids.shape[1] + 2])
    stopped = skipdecode.generate(model, ids, None, max_new_tokens=16, first_exit=2, last_exit=1, eos_token_id=eos)
    first = (stopped.sequences[0, ids.shape[1]:] == eos).nonzero()[0, 0]
    assert stopped.sequences.shape[1] == ids.shape[1] + first + 1  # stops once every sequence hit EOS
