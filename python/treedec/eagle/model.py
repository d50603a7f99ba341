"""The EAGLE draft model: one decoder layer over the target's own features.

Two layouts, as the published checkpoints hold them (checkpoint.py reads and writes both):

- EAGLE-3 (`kind="eagle3"`, SpecForge's `LlamaForCausalLMEagle3`): the target's residual streams
  after three of its layers (low, middle, high: `aux_layers`) are concatenated and fused by `fc`
  (3 x target hidden -> hidden). The layer (`midlayer`) normalises the token's embedding
  (`input_layernorm`) and the hidden state (`hidden_norm`) apart, and its attention reads both,
  concatenated (q/k/v take 2 x hidden); the residual is the hidden state. A final `norm` and an
  `lm_head` over a reduced draft vocabulary give the logits; draft id i is target id
  i + d2t[i] (`t2d` marks the target ids that have one).
- EAGLE-1/2 (`kind="eagle1"`, SafeAILab's `cnets.py`): `fc` (with a bias, usually) fuses
  [embedding, feature] where the feature is the target's last hidden state after its final norm;
  the layer (`layers.0`) is a Llama layer without an input norm, and its output goes through the
  target's own LM head, over the whole vocabulary.

Either way, entry i of a sequence pairs the feature at position i (the state whose LM-head output
was token i + 1) with token i + 1, sits at position i, and predicts token i + 2; a drafted entry's
feature is the draft layer's own output at its parent (EAGLE-3's training-time test trains it so).
The layer attends over the drafter's own KV rows (a one-layer TreeCache) through
`ops.tree_attention`, the kernel the target's tree runs on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

KINDS = ("eagle3", "eagle1")


@dataclass
class EagleConfig:
    """What shapes an EAGLE draft model. `vocab_size` is the target's; `draft_vocab_size` the
    LM head's rows (EAGLE-3; the whole vocabulary for EAGLE-1). `aux_layers`: the target layers
    whose outputs EAGLE-3 fuses (None: EAGLE-3's default for the target's depth, see
    `default_aux_layers`). `rope` holds the rotary settings as the checkpoint's config gives them
    (rope_theta, rope_scaling, max_position_embeddings)."""

    kind: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    fc_bias: bool = False
    aux_layers: tuple[int, ...] | None = None
    rope: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind = {self.kind!r} must be one of {KINDS}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of "
                             f"{self.num_key_value_heads} KV heads")
        if self.kind == "eagle1" and self.draft_vocab_size != self.vocab_size:
            raise ValueError("an EAGLE-1 drafter guesses through the target's LM head: draft_vocab_size must be "
                             f"the vocabulary's {self.vocab_size}")
        if self.aux_layers is not None:
            self.aux_layers = tuple(int(i) for i in self.aux_layers)

    @property
    def feature_size(self) -> int:
        """Width of the features the drafter reads per position (EAGLE-3: three layers')."""
        return 3 * self.target_hidden_size if self.kind == "eagle3" else self.target_hidden_size

    def as_dict(self) -> dict:
        return asdict(self)

    def llama_config(self):
        """The transformers LlamaConfig whose MLP, norms and rotary the draft layer uses."""
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                           head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, hidden_act=self.hidden_act,
                           vocab_size=self.vocab_size, **self.rope)


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high layers for a target of `num_layers` (SpecForge's and
    SGLang's default): the outputs of layers 1, L/2 - 1 and L - 4 (0-based)."""
    if num_layers < 4:
        raise ValueError(f"EAGLE-3 reads three layers of a target with at least 4; this one has {num_layers}")
    return (1, num_layers // 2 - 1, num_layers - 4)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, heads, T, D] with cos, sin [B, T, D] (the half-split layout)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DraftAttention(nn.Module):
    def __init__(self, config: EagleConfig):
        super().__init__()
        inputs = 2 * config.hidden_size if config.kind == "eagle3" else config.hidden_size
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(inputs, heads * dim, bias=False)
        self.k_proj = nn.Linear(inputs, kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(inputs, kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, config.hidden_size, bias=False)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, in] -> q [B, Hq, T, D], k, v [B, Hkv, T, D], rotary applied to q and k."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """[B, Hq, T, D] -> [B, T, hidden]."""
        batch, _, length, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))


class DraftLayer(nn.Module):
    """The draft decoder layer; the norms it holds depend on the layout (module docstring)."""

    def __init__(self, config: EagleConfig):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        llama = config.llama_config()
        self.kind = config.kind
        self.self_attn = DraftAttention(config)
        self.mlp = LlamaMLP(llama)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.kind == "eagle3":
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def finish(self, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention's output [B, Hq, T, D] and the MLP."""
        hidden = residual + self.self_attn.output(attended)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class EagleDraft(nn.Module):
    """Parameters named as the checkpoints name them (`midlayer.*` for EAGLE-3, `layers.0.*` for
    EAGLE-1). `embed_tokens` is None where the checkpoint has none: the target's embedding is used."""

    def __init__(self, config: EagleConfig, own_embedding: bool = False):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if own_embedding else None
        layer = DraftLayer(config)
        if config.kind == "eagle3":
            self.fc = nn.Linear(config.feature_size, config.hidden_size, bias=config.fc_bias)
            self.midlayer = layer
            self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
            self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        else:
            self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=config.fc_bias)
            self.layers = nn.ModuleList([layer])
        self.rotary = LlamaRotaryEmbedding(config.llama_config())

    @property
    def layer(self) -> DraftLayer:
        return self.midlayer if self.config.kind == "eagle3" else self.layers[0]

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features [..., feature_size] -> the layer's hidden-state input [..., hidden]
        (EAGLE-3 fuses its three layers here; EAGLE-1 fuses features with embeddings in `inputs`)."""
        return self.fc(features) if self.config.kind == "eagle3" else features

    def inputs(self, embeddings: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention input, residual) of the layer from token embeddings and hidden states [B, T, H]."""
        if self.config.kind == "eagle3":
            layer = self.layer
            return torch.cat((layer.input_layernorm(embeddings), layer.hidden_norm(hidden)), dim=-1), hidden
        fused = self.fc(torch.cat((embeddings, hidden), dim=-1))
        return fused, fused

    def rotary_embeddings(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, positions)

    def draft_logits(self, hidden: torch.Tensor, target_lm_head: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output [..., H] -> logits over the draft vocabulary [..., V_draft] (EAGLE-1:
        the target's LM head weight [V, H], whose vocabulary is the draft's)."""
        if self.config.kind == "eagle3":
            return self.lm_head(self.norm(hidden))
        return hidden @ target_lm_head.to(hidden.dtype).T

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids -> the target's token ids."""
        if self.config.kind == "eagle3":
            return draft_ids + self.d2t[draft_ids]
        return draft_ids

    def draft_positions(self) -> torch.Tensor:
        """int64 [V]: each target id's draft id, -1 where the draft vocabulary lacks it."""
        if self.config.kind != "eagle3":
            return torch.arange(self.config.vocab_size, device=self.fc.weight.device)
        positions = torch.full((self.config.vocab_size,), -1, dtype=torch.int64, device=self.d2t.device)
        draft = torch.arange(self.config.draft_vocab_size, device=self.d2t.device)
        positions[self.target_ids(draft)] = draft
        return positions
