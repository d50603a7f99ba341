"""The Llama layout, shared by most decoder-only families (Llama, Mistral, Mixtral, Qwen2/3 and
their MoE variants, Phi-3, OLMo 2, and the Gemma and Granite adapters built on it):
`model.<base_model_prefix>` holds `embed_tokens`, `layers` (each with `self_attn`), `norm` and
`rotary_emb`, and calls attention through transformers' AttentionInterface, which treedec's
"treedec" backend serves. What differs inside a layer (MoE blocks, fused QKV, extra norms,
residual multipliers, sliding windows: `attention.layer_window`) runs as the layer's own code."""

from __future__ import annotations

import torch

from .. import compat, ops, parallel
from ..attention import TreeStep
from ..cache import TreeCache
from .base import ModelAdapter, execution_device, swapped_layers


class LlamaFamilyAdapter(ModelAdapter):
    def __init__(self, model: torch.nn.Module):
        self.base = getattr(model, model.base_model_prefix)
        # A multimodal model (Gemma 3) wraps its language model: the loop decodes text through the
        # language model alone, which is what the wrapper runs for a prompt without images (a
        # call with images falls back: generation.MODEL_KWARGS_HANDLED).
        self.wrapper = None
        if hasattr(self.base, "language_model"):
            self.wrapper, self.base = self.base, self.base.language_model
        self.cache_kwarg = compat.cache_kwarg_name(self.base)
        super().__init__(model)
        self.num_kv_heads = self._local_kv_heads()

    def _local_kv_heads(self) -> int:
        """KV heads this rank computes: under tensor parallelism k_proj's shard holds its share of
        the heads, and the cache holds only those (config's count on one device)."""
        k_proj = getattr(self.base.layers[0].self_attn, "k_proj", None)
        if k_proj is None or not isinstance(getattr(k_proj, "weight", None), torch.Tensor):
            return self.num_kv_heads
        return parallel.local_tensor(k_proj.weight).shape[0] // self.head_dim

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.base.layers

    @property
    def stack(self) -> torch.nn.Module:
        return self.base

    @property
    def bypassed(self) -> list[torch.nn.Module]:
        return [self.model] + ([self.wrapper] if self.wrapper is not None else [])

    def layer_devices(self) -> list[torch.device]:
        return [execution_device(layer) for layer in self.base.layers]

    def _input_device(self) -> torch.device:
        return execution_device(self.base.embed_tokens)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(tokens.to(self._input_device()))

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.norm(hidden)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                layers: torch.nn.ModuleList | None = None) -> torch.Tensor:
        device = self._input_device()
        with swapped_layers(self.base, layers):
            out = self.base(
                input_ids=tokens.to(device),
                position_ids=positions.to(device),
                # A prepared 4D mask is handed to attention untouched: transformers builds none of its own.
                attention_mask=step.tree_mask.unsqueeze(1).to(device),
                use_cache=True,
                treedec_step=step,
                **{self.cache_kwarg: cache},
            )
        return out.last_hidden_state

    def hidden_states(self, tokens: torch.Tensor, layers: torch.nn.ModuleList | None = None) -> torch.Tensor:
        with swapped_layers(self.base, layers):
            return self.base(input_ids=tokens.to(self._input_device()), use_cache=False).last_hidden_state

    def layer_position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> list:
        """Each layer's rotary (cos, sin) for `run_layers`, as the base model's forward computes them:
        one rotary for every layer here."""
        embeddings = self.base.rotary_emb(hidden, position_ids=position_ids)
        return [embeddings] * self.num_layers

    def supports_row_subsets(self) -> bool:
        return all(hasattr(self.base, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm"))

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                   active: torch.Tensor) -> torch.Tensor:
        """Each layer gathers its rows into a dense block (ops.gather_rows), runs on it, writes KV
        for those rows alone, and scatters the block back (ops.scatter_rows)."""
        hidden = hidden.to(self._input_device())
        batch = hidden.shape[0]
        position_ids = positions.to(hidden.device)
        rotary = self.layer_position_embeddings(hidden, position_ids)
        mask = step.tree_mask.unsqueeze(1).to(hidden.device)
        for index, layer in enumerate(self.base.layers):
            rows = active[index].nonzero().flatten()
            if rows.numel() == 0:
                continue
            cos, sin = rotary[index]
            cache_kwarg = {compat.cache_kwarg_name(layer): cache}
            if rows.numel() == batch:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids,
                               use_cache=True, treedec_step=step, **cache_kwarg)
                continue
            on_device = rows.to(hidden.device)
            with cache.writing_rows(rows):
                block = layer(ops.gather_rows(hidden, on_device), attention_mask=mask[on_device],
                              position_embeddings=(cos[on_device], sin[on_device]),
                              position_ids=position_ids[on_device], use_cache=True, treedec_step=step.subset(rows),
                              **cache_kwarg)
            hidden = hidden.contiguous()
            ops.scatter_rows(hidden, on_device, block.contiguous())
        return hidden
