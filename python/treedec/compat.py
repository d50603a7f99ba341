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
