"""Every transformers-version switch in one place (supported: 5.17 through the newest 5.x)."""

from __future__ import annotations

import inspect

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("5.17.0")


def check_transformers_version() -> None:
    if TRANSFORMERS_VERSION < MIN_TRANSFORMERS or TRANSFORMERS_VERSION.major != 5:
        raise ImportError(
            f"treedec supports transformers >=5.17,<6; found {transformers.__version__}. "
            "Install a supported version: pip install 'transformers>=5.17,<6'"
        )


def cache_kwarg_name(base_model: torch.nn.Module) -> str:
    """5.17 calls the cache `past_key_values`; later releases renamed it `cache` (old name deprecated)."""
    params = inspect.signature(base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_base_class():
    from transformers.cache_utils import Cache

    return Cache


def sdpa_attention_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as forward

    return forward


def sdpa_mask_function():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


def attention_registries():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionInterface, AttentionMaskInterface


# -- HF's own reading of a generate call ------------------------------------------------------
# The generate front (generation.py) reads a call through these GenerationMixin helpers, so its
# settings mean what they mean to HF (they are the same from 5.17 through 5.25). Private API: when
# a release changes one of them, this is the one place to follow it.

def has_default_lengths(model, generation_config, kwargs: dict) -> tuple[bool, bool]:
    """(max_length, min_length) left at HF's defaults by the call, the passed config and the
    model's: HF then generates 20 *new* tokens (capped at max_position_embeddings)."""
    def unset(name: str) -> bool:
        return (kwargs.get(name) is None and (generation_config is None or getattr(generation_config, name) is None)
                and getattr(model.generation_config, name) is None)

    return unset("max_length"), unset("min_length")


def prepare_generation_config(model, generation_config, kwargs: dict):
    """(GenerationConfig, model kwargs) as HF's generate resolves them: the passed config (or the
    model's), its unset fields from the model's and then from HF's global defaults (`top_k=50`,
    `max_length=20`, ...), the call's kwargs on top, validated (HF's own errors)."""
    return model._prepare_generation_config(generation_config, **kwargs)


def prepare_special_tokens(model, config, has_attention_mask: bool, device, batch_size: int) -> None:
    """Sets config._eos_token_tensor (1-D or None) and config._pad_token_tensor (the first EOS id
    when no pad id is set), from ints, lists, numpy ints or tensors, as HF does."""
    model._prepare_special_tokens(config, has_attention_mask, device=device, batch_size=batch_size)


def infer_attention_mask(model, input_ids, config):
    """HF's mask for a call without one: pad tokens masked where the pad id is in the inputs and
    differs from every EOS id, all ones otherwise (after prepare_special_tokens)."""
    return model._prepare_attention_mask_for_generation(input_ids, config, {})


def prepare_generated_length(model, config, has_default_max: bool, has_default_min: bool, input_ids) -> None:
    """Sets config.max_length for this prompt length as HF does (max_new_tokens wins; the default
    max_length means 20 new tokens); then `validate_generated_length`."""
    model._prepare_generated_length(config, has_default_max, has_default_min, "input_ids", input_ids.shape[1],
                                    input_ids)


def validate_generated_length(model, config, input_length: int, has_default_max: bool) -> None:
    """HF's warnings about the default length, and its ValueError for a prompt already at max_length."""
    model._validate_generated_length(config, input_length, has_default_max)
