"""Every supported model type decodes losslessly (tiny random models built from configs)."""

import pytest
import torch
import transformers

import treedec
from test_decoding import left_padded, repetitive_prompt

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_lossless_for_each_model_type(model_type):
    config_name, model_name, extra = CONFIGS[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**COMMON, **extra)
    model = getattr(transformers, model_name)(config).eval()
    assert model.config.model_type == model_type
    ids, mask = left_padded([repetitive_prompt(21, 9), repetitive_prompt(22, 14)])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    treedec.patch(model, drafter="auto")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False), expected)
