"""Every supported model type decodes losslessly: tiny random models built from configs, greedy
(batch 1 and a left-padded batch of 3) and sampling (token for token against the definition),
sliding windows inside and past the window, layer-skip's row subsets, and the logits each family's
*ForCausalLM returns (soft-caps, divisors)."""

import warnings

import pytest
import torch
import transformers

import treedec
from test_decoding import left_padded, repetitive_prompt
from test_sampling import sample_token_by_token
from treedec.adapters import SUPPORTED_MODEL_TYPES

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = dict(num_experts_per_tok=2)
# model_type -> (config class, model class, what the family adds to COMMON). Values that are
# neutral by default are set so they matter: Granite's multipliers, Gemma's soft-caps (small
# enough to bend these tiny models' logits), Gemma 3's mix of layer types.
CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"sliding_window": None, "num_local_experts": 4, **MOE}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 32,
                                                             "shared_expert_intermediate_size": 64, **MOE}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 16, "num_experts": 4,
                                                             "moe_intermediate_size": 32, **MOE}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                                        "attention_multiplier": 0.2, "logits_scaling": 0.5}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "attn_logit_softcapping": 0.5,
                                                     "final_logit_softcapping": 2.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "final_logit_softcapping": 2.0,
                                                               "layer_types": ["sliding_attention", "full_attention"]}),
    # the multimodal model (what AutoModelForCausalLM loads for Gemma 3 4B and up) on text prompts;
    # its settings go to the text config (build)
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", {"head_dim": 16, "final_logit_softcapping": 2.0,
                                                                   "layer_types": ["sliding_attention", "full_attention"]}),
}
MULTIMODAL = {"gemma3": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=28, patch_size=14),
                             mm_tokens_per_image=4, boi_token_index=93, eoi_token_index=94, image_token_index=95)}
# model_type -> the settings that give it a sliding window of `window` rows
SLIDING = {
    "mistral": lambda window: {"sliding_window": window},
    "mixtral": lambda window: {"sliding_window": window},
    "phi3": lambda window: {"sliding_window": window},
    # Qwen's windows apply from max_window_layers on (Qwen2-MoE's to the layers below it, odd ones)
    "qwen2": lambda window: {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 1},
    "qwen2_moe": lambda window: {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 2},
    "qwen3": lambda window: {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 1},
    "qwen3_moe": lambda window: {"sliding_window": window},  # every layer, as its attention reads it
    "gemma2": lambda window: {"sliding_window": window},
    "gemma3_text": lambda window: {"sliding_window": window},
    "gemma3": lambda window: {"sliding_window": window},
}


def build(model_type: str, seed: int = 0, **overrides):
    """A tiny random model of `model_type` with sharp distributions (drafts get accepted)."""
    config_name, model_name, extra = CONFIGS[model_type]
    torch.manual_seed(seed)
    settings = {**COMMON, **extra, **overrides}
    if model_type in MULTIMODAL:
        config = getattr(transformers, config_name)(text_config=settings, **MULTIMODAL[model_type])
    else:
        config = getattr(transformers, config_name)(**settings)
    model = getattr(transformers, model_name)(config).eval()
    assert model.config.model_type == model_type
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def prompts(batch: int) -> list[list[int]]:
    return [repetitive_prompt(21, 9), repetitive_prompt(22, 14), [5, 7, 9, 5, 7]][:batch]


def greedy_pair(model, prompt_rows, drafter="auto", max_new_tokens=24, **options):
    """(HF's greedy output, treedec's) for these prompts, left-padded; no fallback allowed."""
    ids, mask = left_padded(prompt_rows)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    treedec.patch(model, drafter=drafter, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="treedec: falling back")
        got = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    return expected, got


def test_every_supported_type_is_tested_here():
    assert set(SUPPORTED_MODEL_TYPES) == set(CONFIGS)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_greedy_is_lossless(model_type, batch, flat_step_costs):
    model = build(model_type)
    expected, got = greedy_pair(model, prompts(batch))
    assert torch.equal(got, expected)
    assert model.treedec.last_stats["tau"] > 1.0  # trees were drafted and paths accepted


@pytest.mark.parametrize("settings", [dict(temperature=0.8), dict(temperature=1.0, top_p=0.9, top_k=0)],
                         ids=["fused-top-k", "full-logits"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_sampling_equals_token_by_token_sampling(model_type, settings, flat_step_costs):
    """HF's default top_k=50 samples from the fused top-k's scaled values; top_k=0 from full logits."""
    model = build(model_type, seed=1)
    rows = prompts(3)
    ids, mask = left_padded(rows)
    torch.manual_seed(5)
    expected = sample_token_by_token(model, rows, 16, eos=2, pad=0, **settings)
    treedec.patch(model, drafter="auto")
    torch.manual_seed(5)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, **settings)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_adapter_logits_are_the_models(model_type):
    """The LM head's logits and top-k as the *ForCausalLM returns them (Gemma's soft-cap, Granite's
    divisor), the top-k's values and ids included, and the adapter's embedding what the base model
    embeds with (layer-skip's row subsets start from it)."""
    model = treedec.patch(build(model_type), drafter=None)
    adapter = model.treedec.adapter
    ids = torch.tensor([repetitive_prompt(3, 10)])
    with torch.no_grad():
        want = model(ids).logits
        hidden = adapter.hidden_states(ids)
        torch.testing.assert_close(adapter.logits(hidden), want, atol=1e-5, rtol=1e-5)
        values, top = adapter.topk_values(hidden, 3)
        torch.testing.assert_close(values, want.topk(3).values, atol=1e-5, rtol=1e-5)
        assert torch.equal(top[..., 0], want.argmax(-1))
        captured = {}

        def first_layer_input(module, args, kwargs):
            captured["input"] = args[0] if args else kwargs["hidden_states"]

        hook = adapter.decoder_layers[0].register_forward_pre_hook(first_layer_input, with_kwargs=True)
        model(ids)
        hook.remove()
        torch.testing.assert_close(adapter.embed(ids), captured["input"])


@pytest.mark.parametrize("model_type", sorted(SLIDING))
def test_sliding_windows_inside_and_past_the_window(model_type, flat_step_costs):
    """A window of 5 rows, prompts of 9 and 14 tokens, 30 new tokens, trees deeper than the window:
    every node sees only the rows its own position's window covers, as HF's sliding mask."""
    model = build(model_type, **SLIDING[model_type](5))
    expected, got = greedy_pair(model, prompts(3), drafter="lookup", max_new_tokens=30)
    assert torch.equal(got, expected)
    assert model.treedec.last_stats["tau"] > 1.0
    inside, _ = left_padded([[5, 7, 9]])  # 3 + 2 tokens: inside the window
    short = treedec.unpatch(model).generate(inside, max_new_tokens=2, do_sample=False)
    assert torch.equal(treedec.patch(model, drafter="lookup").generate(inside, max_new_tokens=2, do_sample=False),
                       short)


def test_a_window_changes_the_output():
    """The sliding-window test can fail: the same model attending past its window decodes otherwise."""
    windowed = build("mistral", **SLIDING["mistral"](5))
    full = build("mistral")
    ids, mask = left_padded(prompts(3))
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False)
    assert not torch.equal(windowed.generate(ids, **kwargs), full.generate(ids, **kwargs))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_layerskip_row_subsets(model_type, flat_step_costs):
    """forward_rows with every layer active is the plain forward; per-row layer sets run the rows'
    own subsets (a layer subset keeps each layer's type, Gemma 3's rotary included); layer-skip
    decodes a batch losslessly."""
    from treedec.attention import TreeStep
    from treedec.decoding import chain_tree_mask

    three = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]} \
        if "layer_types" in CONFIGS[model_type][2] else {}
    model = treedec.patch(build(model_type, num_hidden_layers=3, **three), drafter=None)
    adapter = model.treedec.adapter
    assert adapter.supports_row_subsets()
    tokens = torch.tensor([[5, 9, 11], [7, 3, 2]])
    positions = torch.arange(3).expand(2, -1)

    def fresh():
        cache = adapter.new_cache(torch.zeros(2, dtype=torch.int64), max_len=8)
        cache.begin_step(3)
        return cache, TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), chain_tree_mask(2, 3))

    with torch.inference_mode():
        full = adapter.forward(tokens, positions, *fresh())
        everything = torch.ones(3, 2, dtype=torch.bool)
        torch.testing.assert_close(adapter.forward_rows(tokens, positions, *fresh(), everything), full,
                                   atol=1e-5, rtol=1e-5)
        active = everything.clone()
        active[1, 0] = False  # row 0 skips layer 1
        got = adapter.forward_rows(tokens, positions, *fresh(), active)
        alone = adapter.forward(tokens, positions, *fresh(), layers=adapter.layer_subset((0, 2)))
        torch.testing.assert_close(got[0], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], full[1], atol=1e-5, rtol=1e-5)
    treedec.unpatch(model)
    expected, got = greedy_pair(model, prompts(3), drafter="layerskip", mode="exit", exit_layer=1)
    assert torch.equal(got, expected)


def test_gemma3_with_a_tied_256k_vocabulary(flat_step_costs):
    """Gemma 3's 262144-token head tied to its embedding: the fused top-k over the whole vocabulary."""
    model = build("gemma3_text", vocab_size=262144, hidden_size=32, intermediate_size=64, head_dim=8,
                  tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rows = [[5, 7, 9, 5, 7, 9, 5, 7], [100000, 262000, 3]]
    expected, got = greedy_pair(model, rows, max_new_tokens=12)
    assert torch.equal(got, expected)



def test_a_multimodal_model_with_images_or_hooks_on_its_wrapper_falls_back():
    """Gemma 3's multimodal model decodes text through its language model alone: a call with
    images, or a hook on the wrapper the loop never runs, goes to HF's generate, named."""
    model = build("gemma3")
    ids = torch.tensor([[5, 7, 9, 93] + [95] * 4 + [94, 5, 7]])
    pixels = torch.randn(1, 3, 28, 28)
    expected = model.generate(ids, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    treedec.patch(model, drafter="lookup")
    with pytest.warns(UserWarning, match="pixel_values"):
        assert torch.equal(model.generate(ids, pixel_values=pixels, max_new_tokens=6, do_sample=False), expected)
    text = ids[:, :3]
    plain = model.generate(text, max_new_tokens=6, do_sample=False)
    calls = []
    model.model.register_forward_hook(lambda module, args, out: calls.append(1))
    with pytest.warns(UserWarning, match="forward hooks on the Gemma3Model"):
        assert torch.equal(model.generate(text, max_new_tokens=6, do_sample=False), plain)
    assert calls  # HF's generate ran the wrapper, and its hook
