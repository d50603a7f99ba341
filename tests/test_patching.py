"""patch / unpatch / from_pretrained, fallbacks, and every bad-input error."""

import warnings

import pytest
import torch

import treedec
from treedec.tools.models import tiny_llama


def prompt(n=10, seed=0):
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def test_unpatch_restores_behaviour_exactly():
    model = tiny_llama(seed=1)
    ids = prompt()
    original_generate = model.generate
    before = model.generate(ids, max_new_tokens=12, do_sample=False)
    logits_before = model(ids).logits
    impl = model.config._attn_implementation

    treedec.patch(model, drafter="auto")
    assert model.config._attn_implementation == "treedec" and hasattr(model, "treedec")
    # A plain forward on a patched model behaves like sdpa.
    torch.testing.assert_close(model(ids).logits, logits_before, atol=1e-5, rtol=1e-5)

    treedec.unpatch(model)
    assert model.config._attn_implementation == impl and not hasattr(model, "treedec")
    assert model.generate.__func__ is original_generate.__func__ and "generate" not in model.__dict__
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), before)
    with pytest.raises(ValueError, match="not patched"):
        treedec.unpatch(model)


def test_repatching_switches_drafter_and_keeps_learned_state():
    model = treedec.patch(tiny_llama(seed=2), drafter="recycling")
    model.generate(prompt(), max_new_tokens=10, do_sample=False)
    learned = model.treedec.learned
    treedec.patch(model, drafter="lookup", max_ngram=3)
    assert model.treedec.drafter == "lookup" and model.treedec.learned is learned
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        treedec.patch(model, drafter="lookup", min_ngram=5)
    assert model.treedec.drafter == "lookup" and model.treedec.options == {"max_ngram": 3}  # untouched


def test_padded_batch_forward_on_patched_model_matches_sdpa():
    model = tiny_llama(seed=3)
    ids = torch.randint(3, 96, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    expected = model(ids, attention_mask=mask).logits
    treedec.patch(model)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[:, 2:], expected[:, 2:], atol=1e-5, rtol=1e-5)


def test_from_pretrained_patches_at_load_time(tmp_path):
    tiny_llama(seed=4).save_pretrained(tmp_path)
    model = treedec.AutoModelForCausalLM.from_pretrained(str(tmp_path), drafter="lookup", max_ngram=2)
    assert model.treedec.drafter == "lookup" and model.treedec.options == {"max_ngram": 2}
    reference = tiny_llama(seed=4)
    ids = prompt(seed=4)
    assert torch.equal(model.generate(ids, max_new_tokens=15, do_sample=False),
                       reference.generate(ids, max_new_tokens=15, do_sample=False))


def test_unsupported_model_type_is_refused_and_model_untouched():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="model_type .gpt2.: it has no adapter.*supported: llama, mistral, mixtral"):
        treedec.patch(model)
    assert model.config._attn_implementation == impl and not hasattr(model, "treedec")


@pytest.mark.parametrize(
    "drafter, options, message",
    [
        ("medusa-ish", {}, "unknown drafter"),
        ("lookup", {"max_tree_nodes": 0}, "max_tree_nodes"),
        ("lookup", {"recycling_width": 4}, "unknown option"),
        ("lookup", {"min_ngram": 3, "max_ngram": 2}, "min_ngram <= max_ngram"),
        (None, {"max_ngram": 3}, "unknown option"),
    ],
)
def test_bad_drafter_or_option_leaves_model_unpatched(drafter, options, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        treedec.patch(model, drafter=drafter, **options)
    assert not hasattr(model, "treedec") and model.config._attn_implementation == "sdpa"


def test_bad_inputs_raise_before_any_work():
    model = treedec.patch(tiny_llama())
    ids = prompt()
    with pytest.raises(ValueError, match="integer tensor"):
        model.generate(ids.float(), max_new_tokens=5, do_sample=False)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 96\)"):
        model.generate(ids + 200, max_new_tokens=5, do_sample=False)
    with pytest.raises(ValueError, match="max_new_tokens"):  # HF's own check, HF's message
        model.generate(ids, max_new_tokens=0, do_sample=False)
    assert model.treedec.last_stats == {}


@pytest.mark.parametrize("mask, reason", [([1] * 8 + [0, 0], "padding after real tokens"), ([0] * 10, "no real tokens")])
def test_masks_that_are_no_left_padded_batch_fall_back_to_hf(mask, reason):
    model = tiny_llama()
    ids, mask = prompt(), torch.tensor([mask])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's own warning about right padding
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    treedec.patch(model)
    with pytest.warns(UserWarning, match=reason):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected) and model.treedec.last_stats == {}


def test_unsupported_generate_modes_fall_back_with_one_warning():
    model = tiny_llama(seed=5)
    ids = prompt(seed=5)
    sampling = dict(max_new_tokens=8, do_sample=True, no_repeat_ngram_size=2)  # reads the path: HF's job
    torch.manual_seed(0)
    expected = model.generate(ids, **sampling)
    treedec.patch(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        got = model.generate(ids, **sampling)
        torch.manual_seed(0)
        model.generate(ids, **sampling)
    assert torch.equal(got, expected)  # the fallback is HF itself, random stream included
    messages = [str(w.message) for w in caught if "treedec" in str(w.message)]
    assert len(messages) == 1 and "no_repeat_ngram_size" in messages[0]
    with pytest.warns(UserWarning, match="beam search"):
        beams = model.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False)
    assert beams.shape == (1, 16)
    with pytest.warns(UserWarning, match="repetition_penalty"):
        model.generate(ids, max_new_tokens=6, do_sample=False, repetition_penalty=1.3)


@pytest.mark.parametrize("drafter, options, message", [
    ("auto", {"max_tree_node": 8}, "unknown option.*max_tree_node.*allowed: "),  # a typo: HF refuses it too
    ("lookup", {"recycling_width": 3}, "unknown option.*recycling_width.*drafter='lookup'"),  # another drafter's
    (None, {"heads": "x"}, "unknown option.*heads"),
])
def test_from_pretrained_gives_patchs_message_for_unknown_options(tmp_path, monkeypatch, drafter, options, message):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message) as from_patch:
        treedec.patch(tiny_llama(), drafter=drafter, **options)
    with pytest.raises(ValueError, match=message) as from_load:
        treedec.AutoModelForCausalLM.from_pretrained(str(tmp_path), drafter=drafter, **options)
    assert str(from_load.value) == str(from_patch.value)


def test_from_pretrained_checks_option_values_before_loading(tmp_path, monkeypatch):
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("transformers loaded a model before treedec checked its options")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ValueError, match="max_tree_nodes"):
        treedec.AutoModelForCausalLM.from_pretrained(str(tmp_path), drafter="auto", max_tree_nodes=True)
    with pytest.raises(ValueError, match="recycling_width"):
        treedec.AutoModelForCausalLM.from_pretrained(str(tmp_path), drafter="lookup", recycling_width=2)
    with pytest.raises(ValueError, match="template_nodes = 0"):
        treedec.AutoModelForCausalLM.from_pretrained(str(tmp_path), drafter="auto", template_nodes=0)


@pytest.mark.parametrize("drafter, options, message", [
    ("recycling", {"template_nodes": 0}, "template_nodes = 0 must be an int >= 1"),
    ("recycling", {"max_depth": -1}, "max_depth = -1 must be an int >= 1"),
    ("recycling", {"recycling_width": 2.7}, "recycling_width = 2.7 must be an int"),
    ("auto", {"recycling_width": "8"}, "recycling_width = '8' must be an int"),
    ("auto", {"max_tree_nodes": True}, "max_tree_nodes = True must be an int"),
    ("lookup", {"min_ngram": 1.5}, "min_ngram = 1.5 must be an int"),
    ("lookup", {"max_draft_len": None}, "max_draft_len = None must be an int"),
    ("lookup", {"max_matches": 0}, "max_matches = 0 must be an int"),
    ("auto", {"cpu_linear": 1}, "cpu_linear = 1 must be True or False"),
    ("medusa", {"heads": "x", "context": "yes"}, "context = 'yes' must be True or False"),
    ("auto", {"acceptance": "typical", "posterior_alpha": float("nan")}, "posterior_alpha = nan must be a number"),
])
def test_bad_option_values_are_clear_errors_at_patch(drafter, options, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        treedec.patch(model, drafter=drafter, **options)
    assert not hasattr(model, "treedec")


def test_numpy_integers_are_ints_for_options():
    import numpy as np

    model = treedec.patch(tiny_llama(seed=6), drafter="auto", max_tree_nodes=np.int64(8), template_nodes=np.int32(12),
                          max_ngram=np.int64(3))
    ids = prompt(seed=6)
    got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert model.treedec.last_stats  # decoded by treedec, not handed to HF
    assert torch.equal(got, treedec.unpatch(model).generate(ids, max_new_tokens=8, do_sample=False))


def test_corrupt_heads_config_names_the_file(tmp_path):
    from treedec.heads import build_heads, HeadsConfig, save

    save(build_heads(HeadsConfig("medusa", 2, 64, 96)), tmp_path)
    for text in ("{not json", "[1, 2]", '{"kind": "medusa"}'):
        (tmp_path / "heads.json").write_text(text)
        with pytest.raises(ValueError, match=f"{tmp_path / 'heads.json'} is not a valid heads config"):
            treedec.patch(tiny_llama(), drafter="medusa", heads=str(tmp_path))
