"""Model adapters, one per model family, keyed by `config.model_type`: a new architecture is one
adapter here, not edits across the loop and the drafters (see `base.ModelAdapter`)."""

from __future__ import annotations

from .base import ModelAdapter, plain_linear, text_config
from .gemma import GemmaFamilyAdapter
from .granite import GraniteAdapter
from .llama import LlamaFamilyAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llama": LlamaFamilyAdapter,
    "mistral": LlamaFamilyAdapter,
    "mixtral": LlamaFamilyAdapter,
    "qwen2": LlamaFamilyAdapter,
    "qwen2_moe": LlamaFamilyAdapter,
    "qwen3": LlamaFamilyAdapter,
    "qwen3_moe": LlamaFamilyAdapter,
    "phi3": LlamaFamilyAdapter,
    "olmo2": LlamaFamilyAdapter,
    "granite": GraniteAdapter,
    "gemma": GemmaFamilyAdapter,
    "gemma2": GemmaFamilyAdapter,
    "gemma3_text": GemmaFamilyAdapter,
    "gemma3": GemmaFamilyAdapter,  # Gemma3ForConditionalGeneration, on text
}
SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)


def adapter_for(model) -> ModelAdapter:
    """The adapter of `model`'s family; a ValueError naming the supported types otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"treedec does not support model_type {model_type!r}: it has no adapter for that family's layout "
            f"(treedec.adapters); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "GemmaFamilyAdapter", "GraniteAdapter", "LlamaFamilyAdapter",
           "ModelAdapter", "adapter_for", "plain_linear", "text_config"]
