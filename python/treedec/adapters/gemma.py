"""The Gemma families (Gemma, Gemma 2, Gemma 3, text-only or its multimodal model on text): the
Llama layout, with what their base model and *ForCausalLM add around it.

- The embedding is scaled by sqrt(hidden) inside `embed_tokens` (transformers' ScaledWordEmbedding),
  so `embed` needs nothing of its own.
- Gemma 2 and 3 soft-cap the final logits (`final_logit_softcapping`): `scale_logits` (not Gemma
  3's multimodal model, which returns them uncapped).
- Gemma 2 soft-caps attention scores (its layers pass `softcap`) and alternates sliding and global
  layers (`config.layer_types`; each layer passes its `sliding_window`): the attention backend
  handles both (`attention.layer_window`, `ops.tree_attention`).
- Gemma 3 rotates sliding and global layers with different bases: its rotary takes the layer type.
"""

from __future__ import annotations

import inspect

import torch

from .llama import LlamaFamilyAdapter


class GemmaFamilyAdapter(LlamaFamilyAdapter):
    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        # Gemma3ForConditionalGeneration returns its LM head's logits uncapped, whatever its text
        # config says (transformers 5.17-5.25); the *ForCausalLM models cap them
        capped = self.wrapper is None
        self.logit_softcap = getattr(self.config, "final_logit_softcapping", None) if capped else None
        self.transforms_logits = self.logit_softcap is not None
        rotary = inspect.signature(self.base.rotary_emb.forward).parameters
        self.rotary_by_layer_type = "layer_type" in rotary

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.logit_softcap is None:
            return logits
        return torch.tanh(logits / self.logit_softcap) * self.logit_softcap  # the ForCausalLM's order

    def layer_position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> list:
        if not self.rotary_by_layer_type:
            return super().layer_position_embeddings(hidden, position_ids)
        layer_types = self.config.layer_types[: self.num_layers]
        by_type = {kind: self.base.rotary_emb(hidden, position_ids, kind) for kind in set(layer_types)}
        return [by_type[kind] for kind in layer_types]
