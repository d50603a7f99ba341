"""generate behaves as HF's does for the everyday calls: lengths, output tensors, the LM head as a
module, the cache's growth, offloading, stopping criteria, numpy arguments. Each test compares
against unpatched HF on the same tiny model."""

import warnings

import numpy as np
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

import treedec
from helpers import OracleDrafter
from test_decoding import greedy_continuation, left_padded, repetitive_prompt
from treedec import cache as cache_module
from treedec import decoding
from treedec.adapters import ModelAdapter
from treedec.tools.models import tiny_llama


def hf_then_treedec(model, *args, drafter="auto", patch_options=None, **kwargs):
    """(HF's output, treedec's output) for the same call on `model` (patched in between)."""
    expected = model.generate(*args, **kwargs)
    treedec.patch(model, drafter=drafter, **(patch_options or {}))
    return expected, model.generate(*args, **kwargs)


def no_fallback(model) -> None:
    assert model.treedec.last_stats, "treedec fell back to HF"


# -- 1. lengths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [10, 30])
def test_no_max_new_tokens_means_20_new_tokens_as_in_hf(length):
    model = tiny_llama(seed=1)
    ids = torch.tensor([repetitive_prompt(1, length)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's "model-agnostic default max_length" warning, both times
        expected, got = hf_then_treedec(model, ids, do_sample=False, eos_token_id=None)  # the length alone
    assert expected.shape == (1, length + 20) and torch.equal(got, expected)
    no_fallback(model)


def test_lengths_from_the_model_generation_config_and_a_passed_one():
    from transformers import GenerationConfig

    model = tiny_llama(seed=2)
    ids = torch.tensor([repetitive_prompt(2, 12)])
    model.generation_config.max_new_tokens = 7
    expected = model.generate(ids, do_sample=False)
    passed = GenerationConfig(max_length=17, do_sample=False)
    expected_passed = model.generate(ids, generation_config=passed)
    treedec.patch(model)
    assert expected.shape == (1, 19) and torch.equal(model.generate(ids, do_sample=False), expected)
    # the model's max_new_tokens fills the passed config's unset field, and wins over its max_length
    assert expected_passed.shape == (1, 19) and torch.equal(model.generate(ids, generation_config=passed),
                                                             expected_passed)
    no_fallback(model)


def test_a_prompt_at_max_length_gets_hfs_error():
    model = treedec.patch(tiny_llama())
    with pytest.raises(ValueError, match="max_length"):
        model.generate(torch.tensor([repetitive_prompt(0, 12)]), max_length=12, do_sample=False)


def test_up_to_the_last_position_embedding_is_served_as_hf_serves_it():
    model = tiny_llama(seed=3, max_position_embeddings=64)
    ids = torch.tensor([repetitive_prompt(3, 64)])
    expected, got = hf_then_treedec(model, ids, max_new_tokens=1, do_sample=False)
    assert torch.equal(got, expected)
    no_fallback(model)
    ids = torch.tensor([repetitive_prompt(3, 60)])  # ordinary rope rotates past the table alike
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False),
                       treedec.unpatch(model).generate(ids, max_new_tokens=12, do_sample=False))


def test_a_rope_that_changes_with_length_falls_back_past_its_limit():
    model = tiny_llama(seed=4, max_position_embeddings=64, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                           "rope_theta": 10000.0})
    ids = torch.tensor([repetitive_prompt(4, 20)])
    with pytest.warns(UserWarning, match="rope_type 'dynamic'"):
        expected, got = hf_then_treedec(model, ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(got, expected) and model.treedec.last_stats == {}
    short = treedec.unpatch(model).generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    treedec.patch(model)
    got_short = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # 8 + 4 + a tree below 64
    assert torch.equal(got_short, short)
    no_fallback(model)


# -- 2. the output tensor ------------------------------------------------------------------------
def test_the_output_is_an_ordinary_tensor_usable_in_autograd():
    model = treedec.patch(tiny_llama(seed=5))
    out = model.generate(torch.tensor([repetitive_prompt(5, 10)]), max_new_tokens=6, do_sample=False)
    assert not out.is_inference() and out.dtype == torch.int64
    out[:, -1] = 0  # an inference tensor refuses in-place writes outside inference mode
    logits = model(out).logits  # e.g. RL fine-tuning: log-probs of the generation, with grad
    logits.log_softmax(-1).gather(-1, out[:, 1:, None]).sum().backward()
    assert model.lm_head.weight.grad is not None


# -- 3. the LM head is the module it is ------------------------------------------------------------
class LoraLike(torch.nn.Module):
    """A peft-style wrapper: the base projection plus a low-rank update, no `weight` of its own."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4):
        super().__init__()
        self.base_layer = base
        self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_b.weight, std=0.5)

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


class Scaled(torch.nn.Linear):
    """An nn.Linear subclass with its own forward."""

    def forward(self, x):
        out = super().forward(x)
        return out + 3.0 * out.roll(1, dims=-1)


def _with_bias(model):
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight.data.copy_(head.weight.data)
    torch.nn.init.normal_(biased.bias, std=2.0)
    model.lm_head = biased


def _hooked(model):
    def favour(module, inputs, output):
        return output + torch.linspace(0, 4, output.shape[-1])  # a steering bias on the logits

    model.lm_head.register_forward_hook(favour)


def _subclassed(model):
    head = model.lm_head
    scaled = Scaled(head.in_features, head.out_features, bias=False)
    scaled.weight.data.copy_(head.weight.data)
    model.lm_head = scaled


def _lora(model):
    model.lm_head = LoraLike(model.lm_head)


HEAD_CHANGES = {"hook": _hooked, "bias": _with_bias, "subclass": _subclassed, "lora": _lora}


@pytest.mark.parametrize("change", sorted(HEAD_CHANGES))
@pytest.mark.parametrize("after_patch", [False, True])
def test_the_lm_head_runs_as_the_module_it_is(change, after_patch):
    model = tiny_llama(seed=6)
    ids, mask = left_padded([repetitive_prompt(6, 9), repetitive_prompt(7, 14)])
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    plain = model.generate(ids, **kwargs)
    if after_patch:  # the loop has read the plain head once before it changes
        treedec.patch(model, drafter="auto").generate(ids, **kwargs)
    HEAD_CHANGES[change](model)
    if not after_patch:
        treedec.patch(model, drafter="auto")
    got = model.generate(ids, **kwargs)
    no_fallback(model)
    expected = treedec.unpatch(model).generate(ids, **kwargs)
    assert not torch.equal(expected, plain)  # the change does change HF's tokens
    assert torch.equal(got, expected)


def test_a_head_replaced_after_patch_is_the_one_decoding_uses():
    model = treedec.patch(tiny_llama(seed=7), drafter="lookup")
    ids = torch.tensor([repetitive_prompt(7, 12)])
    model.generate(ids, max_new_tokens=4, do_sample=False)
    replacement = torch.nn.Linear(64, 96, bias=False)
    torch.nn.init.normal_(replacement.weight, std=0.3)
    model.lm_head = replacement  # after patch, with no re-patch
    got = model.generate(ids, max_new_tokens=12, do_sample=False)
    no_fallback(model)
    assert torch.equal(got, treedec.unpatch(model).generate(ids, max_new_tokens=12, do_sample=False))


def test_sampling_reads_a_hooked_head_too():
    model = tiny_llama(seed=8)

    def only_token_7(module, inputs, output):
        forced = torch.full_like(output, -1e4)
        forced[..., 7] = 0.0
        return forced

    model.lm_head.register_forward_hook(only_token_7)
    treedec.patch(model, drafter="auto")
    out = model.generate(torch.tensor([repetitive_prompt(8, 10)]), max_new_tokens=12, do_sample=True, top_k=50)
    assert out[0, 10:].tolist() == [7] * 12
    no_fallback(model)


def test_hooks_on_the_model_itself_fall_back():
    model = tiny_llama(seed=9)
    model.register_forward_hook(lambda module, inputs, output: None)
    ids = torch.tensor([repetitive_prompt(9, 10)])
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    treedec.patch(model)
    with pytest.warns(UserWarning, match="forward hooks on the LlamaForCausalLM"):
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


# -- 4. the cache grows as it is used -----------------------------------------------------------
def _capture_caches(monkeypatch) -> list:
    caches = []
    original = ModelAdapter.new_cache

    def spy(self, *args, **kwargs):
        caches.append(original(self, *args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(ModelAdapter, "new_cache", spy)
    return caches


def test_a_huge_max_new_tokens_reserves_no_more_than_a_short_call(monkeypatch):
    model = tiny_llama(seed=10)
    ids = torch.tensor([repetitive_prompt(10, 12)])
    first = greedy_continuation(model, ids, None, 1)[0][0]
    treedec.patch(model, drafter="auto")
    caches = _capture_caches(monkeypatch)
    out = model.generate(ids, max_new_tokens=1_000_000, eos_token_id=first, do_sample=False)
    assert out[0, 12:].tolist() == [first]
    assert caches[-1].max_len > 1_000_000 and caches[-1].capacity <= 12 + cache_module.GROWTH_ROWS + 64


def test_a_cache_that_grows_many_times_decodes_losslessly(monkeypatch):
    monkeypatch.setattr(cache_module, "GROWTH_ROWS", 3)
    monkeypatch.setattr(decoding, "GROWTH_ROWS", 3)
    model = tiny_llama(seed=11)
    ids, mask = left_padded([repetitive_prompt(11, 7), repetitive_prompt(12, 15)])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=70, do_sample=False)
    treedec.patch(model, drafter="auto")
    caches = _capture_caches(monkeypatch)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=70, do_sample=False), expected)
    assert caches[-1].capacity > 15 + 3 + 33  # it grew past its first rows (prompt + 3 + a tree's)


# -- 5. offloading and device maps: weights accelerate loads in its hooks ----------------------
def decodes_without_fallback(model, ids, mask=None, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="treedec: falling back")
        return model.generate(ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("drafter", [None, "auto", "layerskip"])
def test_an_offloaded_model_decodes_losslessly(drafter):
    """accelerate's cpu_offload: every weight on the meta device, loaded by a hook on each leaf
    module for its forward; the cache and the inputs go to the hooks' execution device."""
    from accelerate import cpu_offload

    model = tiny_llama(seed=12, num_layers=3)
    ids, mask = left_padded([repetitive_prompt(12, 10), repetitive_prompt(13, 17), [5, 6, 7]])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    options = {"mode": "exit", "exit_layer": 1} if drafter == "layerskip" else {}
    treedec.patch(model, drafter=drafter, **options)
    torch.manual_seed(4)  # treedec's sample before offloading: a seed fixes its tokens, whatever the trees
    resident_sample = decodes_without_fallback(model, ids, mask, max_new_tokens=12, do_sample=True)
    treedec.unpatch(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in model.parameters())
    treedec.patch(model, drafter=drafter, **options)
    got = decodes_without_fallback(model, ids, mask, max_new_tokens=30, do_sample=False)
    assert torch.equal(got, expected)
    torch.manual_seed(4)
    assert torch.equal(decodes_without_fallback(model, ids, mask, max_new_tokens=12, do_sample=True), resident_sample)


def test_a_device_map_with_disk_offload_decodes_losslessly(tmp_path):
    """A multi-entry device_map, one layer offloaded to disk: its hook (on the layer) loads it."""
    from transformers import AutoModelForCausalLM

    tiny_llama(seed=12).save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload"))
    assert any(p.device.type == "meta" for p in model.model.layers[1].parameters())
    ids, mask = left_padded([repetitive_prompt(12, 10), repetitive_prompt(14, 13)])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    treedec.patch(model, drafter="auto")
    assert torch.equal(decodes_without_fallback(model, ids, mask, max_new_tokens=30, do_sample=False), expected)


def test_an_explicit_device_map_decodes_losslessly(tmp_path):
    """Every layer its own device_map entry (all on the CPU here; on a GPU machine the same code
    puts each layer's KV rows where the map puts the layer)."""
    from transformers import AutoModelForCausalLM

    tiny_llama(seed=12, num_layers=3).save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map)
    ids, mask = left_padded([repetitive_prompt(12, 10), repetitive_prompt(14, 13)])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    treedec.patch(model, drafter="auto")
    assert torch.equal(decodes_without_fallback(model, ids, mask, max_new_tokens=30, do_sample=False), expected)


def test_execution_devices_follow_accelerate_hooks():
    """A hook's execution device wins over a parameter's (meta) device, on the module or below it."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    from treedec.adapters.base import execution_device

    with torch.device("meta"):
        layer = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert execution_device(layer) == torch.device("cpu")  # no tensor off the meta device, no hook
    layer[0]._hf_hook = SequentialHook(AlignDevicesHook(execution_device=0))  # as add_hook_to_module leaves it
    assert execution_device(layer) == torch.device("cuda", 0)
    assert execution_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_a_model_on_the_meta_device_is_refused_at_patch():
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="meta device"):
        treedec.patch(model)
    assert not hasattr(model, "treedec")


# -- 6. stopping criteria: the whole batch, once per position -----------------------------------
class Recorder(StoppingCriteria):
    """Records every call; stops row `row` once `after` tokens are generated (None: never)."""

    def __init__(self, prompt_len: int, row: int | None = None, after: int = 0, as_bool: bool = False):
        self.prompt_len, self.row, self.after, self.as_bool = prompt_len, row, after, as_bool
        self.calls = []

    def __call__(self, input_ids, scores, **kwargs):
        self.calls.append((tuple(input_ids.shape), input_ids.tolist(), scores))
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if self.row is not None and input_ids.shape[1] - self.prompt_len >= self.after:
            done[self.row] = True
        return bool(done.all()) if self.as_bool else done


def _uneven_batch(seed):
    """A batch of 3 whose rows the oracle drafts for unevenly (long accepted chunks for row 1)."""
    model = tiny_llama(seed=seed)
    ids, mask = left_padded([repetitive_prompt(seed, 9), repetitive_prompt(seed + 1, 13), repetitive_prompt(seed + 2, 6)])
    return model, ids, mask


@pytest.mark.parametrize("eos", ["config", None])
@pytest.mark.parametrize("row", [None, 2, 0])
def test_stopping_criteria_see_hfs_calls_and_stop_hfs_rows(eos, row, flat_step_costs):
    model, ids, mask = _uneven_batch(13)
    kwargs = dict(attention_mask=mask, max_new_tokens=15, do_sample=False)
    if eos is None:
        kwargs.update(eos_token_id=None, pad_token_id=None)
    hf_criterion = Recorder(ids.shape[1], row, after=4)
    expected = model.generate(ids, stopping_criteria=StoppingCriteriaList([hf_criterion]), **kwargs)
    continuations = greedy_continuation(model, ids, mask, 15)
    treedec.patch(model, drafter=OracleDrafter([c[:] for c in continuations], depth=6))
    ours = Recorder(ids.shape[1], row, after=4)
    got = model.generate(ids, stopping_criteria=StoppingCriteriaList([ours]), **kwargs)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert ours.calls == hf_criterion.calls  # same calls, same order, whole batch, scores None
    assert model.treedec.last_stats["tau"] > 1.5  # rows did advance by several tokens a step


def test_a_criterion_returning_a_bool_and_a_plain_list_of_criteria():
    model, ids, mask = _uneven_batch(14)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    expected = model.generate(ids, stopping_criteria=[Recorder(ids.shape[1], 1, after=3, as_bool=True)], **kwargs)
    treedec.patch(model, drafter="auto")
    got = model.generate(ids, stopping_criteria=[Recorder(ids.shape[1], 1, after=3, as_bool=True)], **kwargs)
    assert torch.equal(got, expected)
    no_fallback(model)


@pytest.mark.parametrize("criterion", ["max_length_longer", "max_length_shorter", "eos"])
def test_criteria_that_replace_hfs_own_replace_them_here_too(criterion):
    model, ids, mask = _uneven_batch(15)
    continuation = greedy_continuation(model, ids, mask, 10)
    made = {"max_length_longer": lambda: MaxLengthCriteria(ids.shape[1] + 14),
            "max_length_shorter": lambda: MaxLengthCriteria(ids.shape[1] + 5),
            "eos": lambda: EosTokenCriteria(continuation[0][3])}[criterion]
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    if criterion == "eos":  # the settings' EOS id, which the criterion replaces: row 1 runs past it
        config_eos = next(t for t in continuation[1][:4] if t not in continuation[0][:4])
        kwargs.update(eos_token_id=config_eos)
    expected = model.generate(ids, stopping_criteria=StoppingCriteriaList([made()]), **kwargs)
    if criterion == "eos":
        row = expected[1, ids.shape[1]:].tolist()
        assert config_eos in row[:-1] and len(row) == 10
    treedec.patch(model, drafter="auto")
    assert torch.equal(model.generate(ids, stopping_criteria=StoppingCriteriaList([made()]), **kwargs), expected)
    no_fallback(model)


# -- 8. numpy arguments, as HF takes them ------------------------------------------------------
def test_numpy_integers_for_lengths_and_special_tokens():
    model = tiny_llama(seed=16)
    ids = torch.tensor([repetitive_prompt(16, 10)])
    eos = greedy_continuation(model, ids, None, 8)[0][5]
    kwargs = dict(max_new_tokens=np.int64(8), eos_token_id=np.int64(eos), do_sample=False)
    expected, got = hf_then_treedec(model, ids, **kwargs)
    assert torch.equal(got, expected)
    no_fallback(model)
    as_list = dict(max_new_tokens=np.int32(8), eos_token_id=[np.int64(eos), 2], pad_token_id=np.int64(0))
    assert torch.equal(model.generate(ids, do_sample=False, **as_list),
                       treedec.unpatch(model).generate(ids, do_sample=False, **as_list))


def test_pad_tokens_in_a_batch_without_mask_are_masked_as_hf_masks_them():
    model = tiny_llama(seed=17)  # pad_token_id 0, eos 2
    ids, _ = left_padded([repetitive_prompt(17, 6), repetitive_prompt(18, 11)], pad=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, got = hf_then_treedec(model, ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)
    no_fallback(model)


# -- what HF does that treedec does not: HF's own generate, with the model's own attention -----------
@pytest.mark.parametrize("settings, reason", [
    (dict(penalty_alpha=0.6, top_k=4, trust_remote_code=True), "contrastive_search"),
    (dict(dola_layers="low", trust_remote_code=True), "dola_generation"),
    (dict(token_healing=True), "token_healing"),
])
def test_generation_modes_treedec_does_not_decode_are_hfs(settings, reason):
    """With the settings HF needs for them, these modes go to HF (they ran as plain greedy); without
    them HF's own error comes back, as from HF."""
    model = treedec.patch(tiny_llama(seed=21))
    ids = torch.tensor([repetitive_prompt(21, 10)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.generate(ids, max_new_tokens=4, do_sample=False, **settings)
        except Exception:  # HF's own refusal (a hub recipe it cannot fetch, no tokenizer): HF's to give
            pass
    assert any(reason in str(w.message) and "falling back" in str(w.message) for w in caught)
    assert model.treedec.last_stats == {}


def test_a_fallback_runs_hf_with_the_models_own_attention():
    """An eager model's fallback is HF's eager generate bit for bit (the patched model attends with
    sdpa outside the loop, whose rounding differs)."""
    model = tiny_llama(seed=22, attn_implementation="eager")
    ids = torch.tensor([repetitive_prompt(22, 10)])
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = model.generate(ids, **kwargs)
    treedec.patch(model)
    with pytest.warns(UserWarning, match="output_scores"):
        got = model.generate(ids, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))
    assert model.config._attn_implementation == "treedec"  # and the patch is back after it


def test_sampling_draws_uniforms_for_the_positions_it_reaches(monkeypatch):
    from treedec import sampling

    made = []
    original = sampling.PositionUniforms.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(sampling.PositionUniforms, "__init__", spy)
    model = treedec.patch(tiny_llama(seed=23))
    ids = torch.tensor([repetitive_prompt(23, 10)])
    out = model.generate(ids, max_new_tokens=10**9, do_sample=True, eos_token_id=list(range(96)))
    assert out.shape == (1, 11) and made[-1].limit == 10**9 and made[-1].upto(1).shape == (1, 1)
    assert made[-1]._table.numel() <= 4 * sampling.UNIFORM_CHUNK  # not a billion floats
