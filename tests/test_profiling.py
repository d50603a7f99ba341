"""The opt-in per-step profile (profiling.py) and the loop's measured linear routing (layers.py)."""

import time

import pytest
import torch

import treedec
from treedec import layers, profiling
from treedec.tools.models import tiny_llama
from treedec.tools.prompts import left_pad


def test_nested_phases_are_charged_their_own_time_only():
    profile = profiling.StepProfile(torch.device("cpu"))
    started = time.perf_counter()
    with profile.phase("forward_other"):
        time.sleep(0.02)
        with profile.phase("attention"):
            time.sleep(0.03)
    profile.step_done(time.perf_counter() - started + 0.01)  # 10 ms outside every phase
    seconds = profile.as_dict()["seconds"]
    assert 0.03 <= seconds["attention"] < 0.045
    assert 0.02 <= seconds["forward_other"] < 0.03  # not 0.05: attention is not counted twice
    assert 0.008 <= seconds["host"] < 0.02
    assert sum(seconds.values()) == pytest.approx(profile.as_dict()["step_seconds"])


def test_unknown_phase_is_a_value_error():
    with pytest.raises(ValueError, match="unknown profile phase 'forward'"):
        with profiling.StepProfile(torch.device("cpu")).phase("forward"):
            pass


def test_merge_and_per_step_ms():
    one = {"steps": 2, "step_seconds": 0.02, "seconds": dict.fromkeys(profiling.PHASES, 0.001)}
    total = profiling.merge([one, None, one])
    assert total["steps"] == 4 and total["step_seconds"] == pytest.approx(0.04)
    assert profiling.per_step_ms(total) == pytest.approx(dict.fromkeys(profiling.PHASES, 0.5))


@pytest.mark.parametrize("drafter", [None, "lookup"])
@pytest.mark.parametrize("sample", [False, True])
def test_generate_reports_a_profile_only_when_asked_and_decodes_the_same(drafter, sample):
    model = tiny_llama(seed=2)
    ids, mask = left_pad([[5, 6, 7, 5, 6, 7, 5, 6], [9, 4, 9, 4]], 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=sample, pad_token_id=0)
    treedec.patch(model, drafter=drafter)
    torch.manual_seed(3)
    plain = model.generate(ids, **kwargs)
    assert "profile" not in model.treedec.last_stats
    treedec.patch(model, drafter=drafter, profile=True)
    torch.manual_seed(3)
    profiled = model.generate(ids, **kwargs)
    assert torch.equal(profiled, plain)
    stats = model.treedec.last_stats
    profile = stats["profile"]
    assert profile["steps"] == stats["steps"] and set(profile["seconds"]) == set(profiling.PHASES)
    seconds = profile["seconds"]
    assert all(v >= 0 for v in seconds.values())
    assert seconds["attention"] > 0 and seconds["forward_other"] > 0 and seconds["lm_head"] > 0
    assert (seconds["sampling"] > 0) == sample
    assert sum(seconds.values()) == pytest.approx(profile["step_seconds"], rel=1e-6)
    assert profile["step_seconds"] <= stats["seconds"] - stats["prefill_seconds"] + 1e-6


def test_a_drafters_forwards_count_as_drafting_not_attention(monkeypatch):
    """Attention is timed in the verify forward only: layer-skip drafts by running the model,
    and its forwards' attention is drafting's time."""
    from test_layerskip import peaked

    from treedec.attention import TreeStep

    profiled = []
    real_attend = TreeStep.attend
    monkeypatch.setattr(TreeStep, "attend", lambda self, *a: profiled.append(self.profile.enabled) or real_attend(self, *a))
    model = peaked(seed=3, num_layers=6, idle_layers=(2, 3))
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6, 7]])
    treedec.patch(model, drafter="layerskip", mode="fixed", skip_layers=[2, 3], stop_below=0.0, profile=True)
    model.generate(ids, max_new_tokens=20, do_sample=False)
    stats = model.treedec.last_stats
    assert stats["layerskip_drafted"] > 0 and stats["profile"]["seconds"]["drafting"] > 0
    assert True in profiled and False in profiled  # verify forwards timed, the drafter's not


def test_profile_option_is_checked():
    with pytest.raises(ValueError, match="profile = 1 must be True or False"):
        treedec.patch(tiny_llama(), drafter=None, profile=1)


# -- the linear routing ------------------------------------------------------------------------

def test_routing_alternates_arms_and_keeps_the_faster():
    routing = layers.LinearRouting(trials=3)
    arms = []
    for seconds_kernel, seconds_torch in [(1.0, 2.0)] * 3:
        for _ in range(2):
            assert routing.start(4)
            arms.append(routing.trying)
            routing.finish(4, seconds_kernel if routing.trying else seconds_torch)
    assert arms == [True, False] * 3
    assert routing.kernel == {4: True} and not routing.start(4) and routing.uses_kernel(4)
    for _ in range(6):  # torch faster at 1 row
        routing.start(1)
        routing.finish(1, 2.0 if routing.trying else 1.0)
    assert routing.kernel[1] is False and not routing.uses_kernel(1)
    assert routing.as_dict() == {1: "torch", 4: "kernel"}


def test_routing_ties_go_to_torch_and_large_row_counts_are_never_tried():
    routing = layers.LinearRouting(trials=2, margin=0.05)
    for _ in range(4):
        routing.start(2)
        routing.finish(2, 0.98 if routing.trying else 1.0)  # 2% faster: within the margin
    assert routing.kernel[2] is False
    assert not routing.start(layers.MAX_ROWS + 1) and not routing.start(0)
    assert routing.uses_kernel(3)  # undecided and not under trial: the kernel


def test_the_loop_decides_per_row_count_and_follows_its_decisions(monkeypatch):
    """A greedy call times its verify forwards with each arm until the row count is decided and
    keeps the decision across calls; a forced decision routes every projection accordingly."""
    from treedec import ops

    calls = []
    real = ops.loop_linear_rows
    monkeypatch.setattr(ops, "loop_linear_rows", lambda device: lambda *a: calls.append(a[0].shape[0]) or real(device)(*a))
    model = tiny_llama(seed=1)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    want = model.generate(ids, max_new_tokens=12, do_sample=False)
    treedec.patch(model, drafter=None)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), want)
    routing = treedec.patching.learned_state(model).linear_routing
    assert 1 in routing.kernel  # 12 one-row steps: 3 trials of each arm decide it
    assert len(routing.samples[(1, True)]) == len(routing.samples[(1, False)]) == routing.trials
    for kernel in (False, True):
        routing.kernel[1] = kernel
        calls.clear()
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), want)
        assert (1 in calls) == kernel  # (the 6-row prefill is a row count of its own)
