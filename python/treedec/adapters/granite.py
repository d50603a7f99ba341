"""IBM Granite: the Llama layout, with three multipliers in the config. The attention scale
(`attention_multiplier`) and the residual one run inside the layers; the base model multiplies the
embeddings by `embedding_multiplier` and the *ForCausalLM divides the logits by `logits_scaling`,
which `embed` and `scale_logits` do for the steps that run the layers themselves."""

from __future__ import annotations

import torch

from .llama import LlamaFamilyAdapter


class GraniteAdapter(LlamaFamilyAdapter):
    transforms_logits = True

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().embed(tokens) * self.config.embedding_multiplier

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.config.logits_scaling
