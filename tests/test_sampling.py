"""Lossless sampling through trees.

Two kinds of evidence:
- exact: with the same seed, treedec's output equals token-by-token inverse-CDF sampling with
  HF's warpers and one uniform per output position, for every drafter, batch sizes above one, EOS
  inside accepted paths and max_new_tokens limits (the tree changes how many tokens a step emits,
  never which);
- statistical: the empirical joint distribution of two sampled tokens matches the exact one,
  enumerated from the model, within a bound whose false-failure probability is below 1e-4, as
  HF's own sampler does; a deliberately wrong verifier fails the same bound.
"""

import math
import warnings

import pytest
import torch
from transformers import GenerationConfig

import treedec
from helpers import OracleDrafter
from test_decoding import left_padded, repetitive_prompt
from treedec import ops, reference
from treedec.drafters.base import DraftTrie, RowDrafter
from treedec.tools.models import tiny_llama
from treedec.sampling import PositionUniforms, Sampler, build_warpers

SETTINGS = {
    "t1": dict(temperature=1.0),
    "t0.6": dict(temperature=0.6),
    "top_k": dict(temperature=0.9, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.8, top_k=0),
    "min_p": dict(temperature=1.0, min_p=0.05, top_k=0),
}


def peaked_llama(seed: int, vocab_size: int = 96):
    """A tiny random Llama with sharper distributions than its random init, so drafts get accepted."""
    model = tiny_llama(seed=seed, vocab_size=vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


def hf_config(**settings) -> GenerationConfig:
    """The settings as HF's generate resolves them: unset fields take HF's global defaults (top_k=50)."""
    config = GenerationConfig(do_sample=True, **settings)
    config.update(**config._get_default_generation_params(), defaults_only=True)
    return config


def inverse_cdf_in_sampling_order(probs: torch.Tensor, uniform: float) -> int:
    """probs [V] -> the token inverse-CDF sampling picks: the 16 most probable tokens first (most
    probable first), then the rest in vocabulary order (treedec.sampling.in_sampling_order)."""
    head = probs.argsort(descending=True, stable=True)[:16]
    rest = torch.ones_like(probs, dtype=torch.bool)
    rest[head] = False
    order = torch.cat([head, rest.nonzero().view(-1)])
    column = int(reference.sample_tokens(probs[order].view(1, -1), torch.tensor([uniform])))
    return int(order[column])


def sample_token_by_token(model, prompts: list[list[int]], max_new_tokens: int, eos: int | None, pad: int,
                          **settings) -> torch.Tensor:
    """The definition treedec must reproduce: per sequence, per position n, HF's warpers, softmax,
    inverse CDF in sampling order with uniform U[b, n]; U drawn as treedec draws them, by a
    generator seeded from torch's right after seeding (sampling.PositionUniforms)."""
    sampler = Sampler(build_warpers(hf_config(**settings)))
    uniforms = PositionUniforms(len(prompts), max_new_tokens).upto(max_new_tokens)
    rows = []
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            ids = list(prompt)
            for n in range(max_new_tokens):
                logits = model(torch.tensor([ids], device=model.device)).logits[:, -1:, :].cpu()
                token = inverse_cdf_in_sampling_order(sampler.probs(logits)[0, 0], float(uniforms[b, n]))
                ids.append(token)
                if token == eos:
                    break
            rows.append(ids[len(prompt):])
    length = max(len(p) for p in prompts)
    width = max(len(r) for r in rows)
    out = torch.full((len(prompts), length + width), pad, dtype=torch.int64)
    for b, (prompt, row) in enumerate(zip(prompts, rows)):
        out[b, length - len(prompt) : length] = torch.tensor(prompt)
        out[b, length : length + len(row)] = torch.tensor(row)
    return out


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("drafter", [None, "lookup", "recycling", "auto"])
def test_equals_token_by_token_sampling(drafter, setting):
    model = peaked_llama(seed=3)
    prompts = [repetitive_prompt(3, 11), repetitive_prompt(4, 19), [7, 8]]
    ids, mask = left_padded(prompts)
    torch.manual_seed(11)
    expected = sample_token_by_token(model, prompts, 24, eos=2, pad=0, **SETTINGS[setting])
    treedec.patch(model, drafter=drafter)
    torch.manual_seed(11)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=True, **SETTINGS[setting])
    assert torch.equal(got, expected)


def test_eos_and_length_limit_inside_accepted_paths(full_trees):
    """An oracle drafter proposing the very tokens sampling will choose: long accepted chunks, which
    EOS and max_new_tokens must cut exactly where token-by-token sampling stops."""
    model = peaked_llama(seed=5)
    prompts = [repetitive_prompt(5, 9), repetitive_prompt(6, 14)]
    ids, mask = left_padded(prompts)
    eos = None
    for max_new in (30, 13):
        # (uniforms come from one seeded generator, so both lengths share their first continuations)
        torch.manual_seed(2)
        free = sample_token_by_token(model, prompts, max_new, eos=None, pad=0, temperature=0.7)
        continuations = [free[b, ids.shape[1]:].tolist() for b in range(2)]
        eos = continuations[0][9] if eos is None else eos  # a token the first sequence samples mid-run
        treedec.patch(model, drafter=OracleDrafter(continuations, depth=8))
        torch.manual_seed(2)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=True, temperature=0.7,
                             eos_token_id=eos, pad_token_id=0)
        torch.manual_seed(2)
        want = sample_token_by_token(model, prompts, max_new, eos=eos, pad=0, temperature=0.7)
        assert torch.equal(got, want)
        assert model.treedec.last_stats["tau"] > 2.5  # the oracle's chunks really were accepted
    assert (got[0] == eos).any()  # the first sequence stopped at EOS inside an accepted chunk


def test_unset_settings_take_hfs_defaults():
    """generate(do_sample=True) without top_k samples with HF's default top_k=50, as HF does; with
    a flat distribution (temperature 3) over 96 tokens that differs from sampling without top-k."""
    model = peaked_llama(seed=3)
    prompts = [repetitive_prompt(3, 11), [7, 8]]
    ids, mask = left_padded(prompts)
    torch.manual_seed(5)
    with_default = sample_token_by_token(model, prompts, 16, eos=None, pad=0, temperature=3.0)
    torch.manual_seed(5)
    without_top_k = sample_token_by_token(model, prompts, 16, eos=None, pad=0, temperature=3.0, top_k=0)
    assert not torch.equal(with_default, without_top_k)
    treedec.patch(model, drafter="auto")
    torch.manual_seed(5)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=3.0,
                         eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, with_default)


def test_seeded_runs_repeat_and_seeds_matter():
    model = treedec.patch(peaked_llama(seed=1), drafter="auto")
    ids = torch.tensor([repetitive_prompt(1, 16)] * 2)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(model.generate(ids, max_new_tokens=30, do_sample=True, temperature=1.0))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_path_dependent_processors_fall_back_with_a_warning():
    model = treedec.patch(peaked_llama(seed=1), drafter="auto")
    ids = torch.tensor([repetitive_prompt(1, 10)])
    with pytest.warns(UserWarning, match="repetition_penalty"):
        model.generate(ids, max_new_tokens=5, do_sample=True, repetition_penalty=1.3)
    assert model.treedec.last_stats == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, max_new_tokens=5, do_sample=True, top_k=3)  # plain warpers: no fallback
    assert model.treedec.last_stats["new_tokens"] == 5


# -- statistics ----------------------------------------------------------------------------------

VOCAB = 12
PROMPT = [3, 4, 5, 3, 4, 5, 3, 4]
SAMPLES = 3000
FALSE_FAILURE = 1e-4


def exact_pairs(model, **settings) -> torch.Tensor:
    """P(x1, x2) after PROMPT, [V, V], enumerated from the model with HF's warpers."""
    sampler = Sampler(build_warpers(hf_config(**settings)))
    with torch.no_grad():
        first = sampler.probs(model(torch.tensor([PROMPT])).logits[:, -1:, :])[0, 0].double()
        extended = torch.tensor([PROMPT + [x] for x in range(VOCAB)])
        second = sampler.probs(model(extended).logits[:, -1:, :])[:, 0].double()
    return first[:, None] * second


def tv_bound(exact: torch.Tensor, samples: int) -> float:
    """TV(empirical, exact) stays below this with probability >= 1 - FALSE_FAILURE: its mean is at most
    0.5 * sum sqrt(p(1-p)/N) (Jensen), and one sample moves it by at most 1/N (McDiarmid)."""
    p = exact.flatten()
    mean = 0.5 * float((p * (1 - p) / samples).sqrt().sum())
    return mean + math.sqrt(math.log(1 / FALSE_FAILURE) / (2 * samples))


def empirical_pairs(generate, batch: int = 500) -> torch.Tensor:
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    ids = torch.tensor([PROMPT] * batch)
    for _ in range(SAMPLES // batch):
        out = generate(ids)[:, len(PROMPT):]
        counts.index_put_((out[:, 0], out[:, 1]), torch.ones(batch, dtype=torch.float64), accumulate=True)
    return counts / counts.sum()


class FixedChain(RowDrafter):
    """Always drafts the same two tokens (the 2nd and 1st most likely first tokens): acceptance
    decisions then decide most of the output, which is what the power check needs."""

    name = "fixed"

    def __init__(self, chain):
        self.chain = chain

    def propose_row(self, seq, root_token, uniforms=None):
        trie = DraftTrie(root_token)
        node = 0
        for depth, token in enumerate(self.chain, start=1):
            node = trie.child(node, token, ("fixed", depth))
        return trie


@pytest.fixture
def full_trees(monkeypatch):
    """Verify every drafted node every step: the sizer would often pick T=1 for a 500-row batch of a
    tiny model (and the draft gate stop drafting), and then the drafts (what these tests are
    about) would never be verified."""
    from treedec import decoding

    def keep_everything(tries, acceptance, cost, max_nodes):
        num_nodes = min(max(len(t) for t in tries), max_nodes)  # a trie's first nodes form a tree
        return num_nodes, [list(range(min(len(t), num_nodes))) for t in tries], float(num_nodes)

    monkeypatch.setattr(decoding.sizing, "choose", keep_everything)
    monkeypatch.setattr(decoding.sizing.CostCurve, "explored_nodes", lambda self, batch: max(decoding.sizing.TREE_SIZES))
    monkeypatch.setattr(decoding.sizing.DraftGate, "opens", lambda self, batch: True)


def distribution_model():
    return peaked_llama(seed=7, vocab_size=VOCAB)


def treedec_sampler(model, drafter, **settings):
    treedec.patch(model, drafter=drafter, max_tree_nodes=4)
    return lambda ids: model.generate(ids, max_new_tokens=2, do_sample=True, eos_token_id=None, pad_token_id=0,
                                      **settings)


@pytest.mark.parametrize("setting", ["t1", "t0.6", "top_k", "top_p"])
def test_joint_distribution_matches_like_hf(setting, full_trees):
    torch.manual_seed(1234)
    model = distribution_model()
    settings = SETTINGS[setting]
    exact = exact_pairs(model, **settings)
    bound = tv_bound(exact, SAMPLES)
    hf = empirical_pairs(lambda ids: model.generate(ids, max_new_tokens=2, do_sample=True, eos_token_id=None,
                                                    pad_token_id=0, **settings))
    ranked = exact.sum(1).argsort(descending=True).tolist()
    for drafter in (None, "lookup", "recycling", "auto", FixedChain([ranked[1], ranked[0]])):
        ours = empirical_pairs(treedec_sampler(model, drafter, **settings))
        if drafter in ("auto", "recycling") or isinstance(drafter, FixedChain):  # these always draft here
            assert model.treedec.last_stats["mean_tree_nodes"] > 1
        if drafter in ("auto", "recycling"):  # and their drafts were coupled to the uniforms
            assert any("coupled" in key for key in model.treedec.learned.sample_acceptance.snapshot())
        assert 0.5 * float((ours - exact).abs().sum()) < bound, drafter
        unpatch_quietly(model)
    assert 0.5 * float((hf - exact).abs().sum()) < bound  # HF's own sampler passes the same test


def test_a_wrong_verifier_fails_the_same_bound(monkeypatch, full_trees):
    """Power: accepting every draft (instead of the sampled target) must be caught."""
    torch.manual_seed(99)
    model = distribution_model()
    exact = exact_pairs(model, temperature=1.0)
    ranked = exact.sum(1).argsort(descending=True).tolist()

    real_verify = ops.verify_greedy

    def accept_all_drafts(parents, tokens, target):
        """Replaces each node's sampled target by its child's draft (a chain here), so every draft passes."""
        target = target.clone()
        target[:, :-1] = torch.where(tokens[:, 1:] >= 0, tokens[:, 1:], target[:, :-1])
        return real_verify(parents, tokens, target)

    monkeypatch.setattr(ops, "verify_greedy", accept_all_drafts)  # what the sampling step verifies with
    wrong = empirical_pairs(treedec_sampler(model, FixedChain([ranked[1], ranked[0]]), temperature=1.0))
    assert 0.5 * float((wrong - exact).abs().sum()) > tv_bound(exact, SAMPLES), float((wrong - exact).abs().sum())


def unpatch_quietly(model):
    if hasattr(model, "treedec"):
        treedec.unpatch(model)


# -- typical acceptance (opt-in, lossy) ----------------------------------------------------------


def test_typical_acceptance_is_opt_in():
    """Exact unless asked for: after a typical run, re-patching without the option samples exactly
    again (token-by-token equality); the typical run itself works on a batch."""
    model = peaked_llama(seed=4)
    prompts = [repetitive_prompt(4, 20)] * 3
    ids = torch.tensor(prompts)
    treedec.patch(model, drafter="auto", acceptance="typical", posterior_threshold=0.3, posterior_alpha=0.5)
    torch.manual_seed(3)
    assert model.generate(ids, max_new_tokens=40, do_sample=True).shape == (3, 60)
    treedec.patch(model, drafter="auto")
    torch.manual_seed(3)
    exact = model.generate(ids, max_new_tokens=40, do_sample=True)
    torch.manual_seed(3)
    assert torch.equal(exact, sample_token_by_token(model, prompts, 40, eos=2, pad=0))


def test_typical_verify_rule():
    """Hand-checked: node 1 (token 7) is not the target but has probability 0.5 > threshold, so it is
    accepted; node 2 below it (token 9, probability 0.01) is neither target nor plausible."""
    from treedec.sampling import TypicalAcceptance, in_sampling_order, typical_verify

    parents = torch.tensor([[-1, 0, 1]], dtype=torch.int32)
    tokens = torch.tensor([[5, 7, 9]])
    target = torch.tensor([[3, 4, 6]])
    probs = torch.zeros(3, 12)
    probs[0, 3], probs[0, 7], probs[0, 1] = 0.4, 0.5, 0.1  # root: entropy ~0.94 -> alpha*exp(-H) ~ 0.12
    probs[1, 4], probs[1, 9], probs[1, 0] = 0.9, 0.01, 0.09
    probs[2, 6] = 1.0
    rule = TypicalAcceptance(posterior_threshold=0.3, posterior_alpha=0.3)
    accept_len, accept_nodes, bonus = typical_verify(parents, tokens, target, in_sampling_order(probs), rule)
    assert accept_len.tolist() == [1] and accept_nodes.tolist() == [[0, 1, -1]] and bonus.tolist() == [4]
    exact = ops.verify_greedy(parents, tokens, target)
    assert exact[0].tolist() == [0]  # the exact rule rejects node 1


@pytest.mark.parametrize("options", [dict(acceptance="loose"), dict(posterior_alpha=0.3),
                                     dict(acceptance="typical", posterior_threshold=0.0),
                                     dict(acceptance="typical", posterior_alpha=-1)])
def test_bad_acceptance_options_raise(options):
    with pytest.raises(ValueError):
        treedec.patch(peaked_llama(seed=1), drafter="auto", **options)
