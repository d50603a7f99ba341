"""BatchStopping on hand-made ragged batches: when it calls the criteria, with what, and what it cuts."""

import torch

from treedec.stopping import BatchStopping


class Calls:
    """Records each call's input_ids; stops the rows in `stop_at` (row -> position)."""

    def __init__(self, prompt_len: int, stop_at: dict[int, int] | None = None):
        self.prompt_len, self.stop_at, self.seen = prompt_len, stop_at or {}, []

    def __call__(self, input_ids, scores):
        assert scores is None
        self.seen.append(input_ids.tolist())
        n = input_ids.shape[1] - self.prompt_len
        return torch.tensor([self.stop_at.get(row) == n for row in range(input_ids.shape[0])])


PROMPTS = torch.tensor([[0, 5, 6], [7, 8, 9]])  # row 0 left-padded with pad id 0


def test_a_position_is_called_once_every_row_has_reached_it():
    calls = Calls(3)
    stopping = BatchStopping([calls], PROMPTS, max_new_tokens=10, pad_token_id=0, finished_rows_pad=True)
    generated = [[11, 12, 13], [21]]
    assert stopping.update(generated, set()) == set()
    assert calls.seen == [[[0, 5, 6, 11], [7, 8, 9, 21]]]  # position 1 only: row 1 is at 1
    generated[1] += [22, 23, 24]
    stopping.update(generated, set())
    assert [len(ids[0]) - 3 for ids in calls.seen] == [1, 2, 3]  # then 2 and 3, in order, once each


def test_padded_rows_stop_where_the_criteria_say_and_later_calls_see_pads():
    calls = Calls(3, stop_at={0: 2})
    stopping = BatchStopping([calls], PROMPTS, max_new_tokens=10, pad_token_id=0, finished_rows_pad=True)
    generated = [[11, 12, 13, 14], [21, 22, 23]]  # row 0 ran ahead of its stop
    assert stopping.update(generated, set()) == {0}
    assert generated[0] == [11, 12]  # cut at position 2
    assert calls.seen[-1] == [[0, 5, 6, 11, 12, 0], [7, 8, 9, 21, 22, 23]]  # pad after the stop


def test_without_eos_a_stopped_row_goes_on_until_every_row_has_stopped():
    calls = Calls(3, stop_at={0: 1, 1: 3})
    stopping = BatchStopping([calls], PROMPTS, max_new_tokens=10, pad_token_id=0, finished_rows_pad=False)
    generated = [[11, 12], [21, 22]]
    assert stopping.update(generated, set()) == set() and generated == [[11, 12], [21, 22]]
    generated[0] += [13, 14]
    generated[1] += [23]
    assert stopping.update(generated, set()) == {0, 1}
    assert generated == [[11, 12, 13], [21, 22, 23]]  # both end where the last one stopped


def test_the_ids_buffer_grows_as_positions_are_reached():
    calls = Calls(3)
    stopping = BatchStopping([calls], PROMPTS, max_new_tokens=1_000_000, pad_token_id=0, finished_rows_pad=True)
    assert stopping.ids.shape[1] < 100  # not prompt + a million columns
    generated = [list(range(100, 400)), list(range(500, 800))]
    stopping.update(generated, set())
    assert len(calls.seen) == 300 and calls.seen[-1][1][3:] == list(range(500, 800))
    assert 303 <= stopping.ids.shape[1] < 1000


def test_a_criterion_may_answer_with_a_python_bool():
    stopping = BatchStopping([lambda ids, scores: ids.shape[1] >= 5], PROMPTS, max_new_tokens=10, pad_token_id=0,
                             finished_rows_pad=True)
    generated = [[1, 2, 3], [4, 5, 6]]
    assert stopping.update(generated, set()) == {0, 1} and generated == [[1, 2], [4, 5]]
