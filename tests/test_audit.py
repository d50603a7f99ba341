"""treedec.audit finds what it is for: identical outputs pass, an injected divergence is a defect
at the right position, a wrong sampler differs in distribution, and a fallback is named."""

import math

import pytest
import torch

import treedec
from test_decoding import repetitive_prompt
from treedec import auditing as audit_module
from treedec import decoding, ops
from treedec.auditing import homogeneity
from treedec.tools.models import tiny_llama

PROMPTS = [repetitive_prompt(s, 9 + 3 * s) for s in range(3)]


def test_a_lossless_drafter_passes():
    model = tiny_llama(seed=1)
    report = treedec.audit(model, PROMPTS, drafter="auto", max_new_tokens=20)
    assert report.ok and all(g.verdict == "identical" for g in report.greedy) and len(report.greedy) == 3
    assert "3/3 identical to HF greedy" in report.table() and "no defect found" in report.table()
    assert not hasattr(model, "treedec")  # it came unpatched and leaves unpatched


def test_an_injected_divergence_is_a_defect_at_its_position(monkeypatch):
    model = tiny_llama(seed=2)
    original = decoding.TreeDecoder._limit

    def corrupt(request, generated, chunk):  # the 6th generated token of every row is wrong
        chunk = [(t + 1) % 96 if len(generated) + i == 5 else t for i, t in enumerate(chunk)]
        return original(request, generated, chunk)

    monkeypatch.setattr(decoding.TreeDecoder, "_limit", staticmethod(corrupt))
    report = treedec.audit(model, PROMPTS[:2], drafter="lookup", max_new_tokens=12)
    assert not report.ok
    for found in report.greedy:
        assert found.verdict == "defect" and found.first_diff == 5
        assert found.logit_gap > found.tie_tolerance > 0
    assert "DEFECT" in report.table() and "at generated token 5" in report.table()


def test_stopping_early_is_a_defect_whatever_the_gap(monkeypatch):
    model = tiny_llama(seed=9)
    original = decoding.TreeDecoder._limit

    def early(request, generated, chunk):  # every row stops after 3 tokens
        chunk, done = original(request, generated, chunk)
        return chunk[: max(0, 3 - len(generated))], done or len(generated) + len(chunk) >= 3

    monkeypatch.setattr(decoding.TreeDecoder, "_limit", staticmethod(early))
    monkeypatch.setattr(audit_module, "logit_gap", lambda *args: (0.0, 1.0))  # a tie, were one asked for
    found = treedec.audit(model, PROMPTS[:1], drafter=None, max_new_tokens=8).greedy[0]
    assert found.verdict == "defect" and found.first_diff == 3 and found.treedec_tokens == 3


def test_a_divergence_at_a_tie_is_called_a_near_tie(monkeypatch):
    model = tiny_llama(seed=3)
    original = decoding.TreeDecoder._limit
    monkeypatch.setattr(decoding.TreeDecoder, "_limit", staticmethod(
        lambda request, generated, chunk: original(request, generated, [(t + 1) % 96 for t in chunk])))
    monkeypatch.setattr(audit_module, "logit_gap", lambda *args: (0.06, 0.25))  # one bf16 step at ~16
    report = treedec.audit(model, PROMPTS[:1], drafter=None, max_new_tokens=5)
    assert report.greedy[0].verdict == "near-tie" and report.ok


def test_the_tie_tolerance_follows_the_dtype():
    model = tiny_llama(seed=4)
    ids = torch.tensor([PROMPTS[0]])
    gap, fp32 = audit_module.logit_gap(model, ids, None, [5, 6])
    _, bf16 = audit_module.logit_gap(model.to(torch.bfloat16), ids, None, [5, 6])
    assert gap >= 0 and 0 < fp32 < bf16  # the logits here are below 1: 1e-4 against two bf16 units


def test_a_fallback_is_named_not_counted_as_identical():
    model = tiny_llama(seed=5)
    model.register_forward_hook(lambda module, inputs, output: None)
    report = treedec.audit(model, PROMPTS[:1], drafter="auto", max_new_tokens=6)
    assert report.greedy[0].verdict.startswith("fell back: forward hooks on the LlamaForCausalLM")


def test_the_model_leaves_patched_as_it_came():
    model = treedec.patch(tiny_llama(seed=6), drafter="lookup", max_ngram=2)
    treedec.audit(model, PROMPTS[:1], drafter="recycling", max_new_tokens=6)
    assert model.treedec.drafter == "lookup" and model.treedec.options == {"max_ngram": 2}


def test_sampling_from_the_right_distribution_is_consistent():
    model = tiny_llama(seed=7)
    report = treedec.audit(model, PROMPTS[:2], drafter="auto", sampling={"temperature": 1.0}, samples=400,
                           positions=3, greedy=False)
    assert report.ok and [s.verdict for s in report.sampling] == ["consistent", "consistent"]
    assert all(len(s.positions) == 3 and all(t.dof > 0 for t in s.positions) for s in report.sampling)


def test_a_wrong_sampler_differs(monkeypatch):
    """Always taking the most probable token: HF's samples spread, treedec's would not."""
    model = tiny_llama(seed=8)
    monkeypatch.setattr(ops, "sample_tokens_deferred",
                        lambda probs, uniforms: (torch.zeros(probs.shape[0], dtype=torch.int64), None))
    monkeypatch.setattr(decoding.ops, "sample_tokens_deferred", ops.sample_tokens_deferred)
    report = treedec.audit(model, PROMPTS[:1], drafter="auto", sampling={"temperature": 1.0}, samples=300,
                           positions=2, greedy=False)
    assert not report.ok and report.sampling[0].verdict == "differs"


def test_homogeneity_against_known_values():
    a = torch.tensor([0] * 10 + [1] * 20)
    b = torch.tensor([0] * 20 + [1] * 10)
    statistic, dof, p = homogeneity(a, b)
    assert dof == 1 and math.isclose(statistic, 20 / 3) and math.isclose(p, 0.009823, rel_tol=1e-3)
    assert homogeneity(torch.tensor([3] * 50), torch.tensor([3] * 50)) == (0.0, 0, 1.0)
    same = homogeneity(torch.randint(0, 4, (2000,)), torch.randint(0, 4, (2000,)))
    assert same[1] == 3 and same[2] > 1e-4


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_new_tokens = 0"):
        treedec.audit(model, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="text prompts need tokenizer"):
        treedec.audit(model, ["hello"])
    with pytest.raises(ValueError, match="one sequence"):
        treedec.audit(model, [torch.zeros(2, 5, dtype=torch.int64)])
