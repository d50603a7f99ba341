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


def resolve_generation_config(model, generation_config):
    """The GenerationConfig HF's `generate` would use before applying call kwargs: a copy of the
    passed config (or the model's), its unset fields filled from the model's, then from HF's
    global defaults (`top_k=50`, `temperature=1.0`, `max_length=20`, ...). Skipping the defaults
    would sample without HF's top-k of 50, a different distribution from HF's."""
    import copy

    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    if generation_config is not None:
        config.update(**model.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**config._get_default_generation_params(), defaults_only=True)
    return config
