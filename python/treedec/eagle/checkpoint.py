"""Reading and writing EAGLE drafters in the formats the field publishes.

EAGLE-3 (what SpecForge writes and SGLang/vLLM read): `config.json` with `architectures` naming an
Eagle3 class (`LlamaForCausalLMEagle3`), `draft_vocab_size`, optionally `target_hidden_size` and
`eagle_config.eagle_aux_hidden_state_layer_ids`; weights `fc.weight`, `midlayer.*`, `norm.weight`,
`lm_head.weight`, `d2t` (int64 [draft vocab]: target id = draft id + d2t[draft id]), `t2d` (bool
[vocab]) and optionally `embed_tokens.weight`.
EAGLE-1/2 (SafeAILab): a Llama `config.json`; weights `fc.weight` (+ `fc.bias`) over
[embedding, feature] and `layers.0.*` without `input_layernorm`, optionally `embed_tokens.weight`.
Weights in `model.safetensors` or `pytorch_model.bin`; a leading `model.` on every name is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .model import EagleConfig, EagleDraft

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHTS_NAMES:
        path = directory / name
        if path.exists():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                weights = load_file(str(path))
            else:
                weights = torch.load(path, map_location="cpu", weights_only=True)
            break
    else:
        raise ValueError(f"{directory} holds no drafter weights (one of {', '.join(WEIGHTS_NAMES)})")
    if weights and all(key.startswith("model.") for key in weights):
        weights = {key[len("model."):]: value for key, value in weights.items()}
    return weights


def is_eagle3(config: dict) -> bool:
    return any("eagle3" in str(name).lower() for name in config.get("architectures") or []) \
        or "draft_vocab_size" in config


def eagle_config(config: dict, weights: dict[str, torch.Tensor]) -> EagleConfig:
    """The EagleConfig of a checkpoint's config.json and weights."""
    kind = "eagle3" if is_eagle3(config) else "eagle1"
    try:
        hidden = int(config["hidden_size"])
        fields = dict(hidden_size=hidden, intermediate_size=int(config["intermediate_size"]),
                      num_attention_heads=int(config["num_attention_heads"]),
                      num_key_value_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                      vocab_size=int(config["vocab_size"]))
    except KeyError as missing:
        raise ValueError(f"the drafter's config.json lacks {missing}") from None
    draft_vocab = int(config.get("draft_vocab_size") or fields["vocab_size"]) if kind == "eagle3" else \
        fields["vocab_size"]
    aux = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    rope = {key: config[key] for key in ("rope_theta", "rope_scaling", "max_position_embeddings")
            if config.get(key) is not None}
    return EagleConfig(kind=kind, draft_vocab_size=draft_vocab,
                       target_hidden_size=int(config.get("target_hidden_size") or hidden),
                       head_dim=config.get("head_dim"), rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                       hidden_act=config.get("hidden_act", "silu"), fc_bias="fc.bias" in weights,
                       aux_layers=tuple(aux) if aux else None, rope=rope, **fields)


def load(path: str | Path) -> EagleDraft:
    """An EAGLE-3 or EAGLE-1/2 drafter from its directory (on the CPU, in the checkpoint's dtype)."""
    directory = Path(path)
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"drafter_path={str(path)!r} is not a drafter directory (no {CONFIG_NAME})")
    config = json.loads((directory / CONFIG_NAME).read_text())
    weights = read_weights(directory)
    if config.get("architectures") is None and "layers.0.self_attn.q_proj.weight" not in weights \
            and "midlayer.self_attn.q_proj.weight" not in weights:
        raise ValueError(f"{directory} is not an EAGLE drafter: neither midlayer.* nor layers.0.* weights")
    eagle = eagle_config(config, weights)
    weights = dict(weights)
    if eagle.kind == "eagle3" and eagle.draft_vocab_size == eagle.vocab_size:  # no reduced vocabulary
        weights.setdefault("d2t", torch.zeros(eagle.vocab_size, dtype=torch.int64))
        weights.setdefault("t2d", torch.ones(eagle.vocab_size, dtype=torch.bool))
    model = EagleDraft(eagle, own_embedding="embed_tokens.weight" in weights)
    dtype = next(t.dtype for k, t in weights.items() if t.is_floating_point())
    model.to(dtype)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory}: the {eagle.kind} layout lacks {missing or 'nothing'} and does not expect "
                         f"{unexpected or 'nothing'}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{directory}: {name} has shape {tuple(tensor.shape)}; the config makes it "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
    if eagle.kind == "eagle3":
        check_vocabulary_maps(model)
    return model.eval()


def check_vocabulary_maps(model: EagleDraft) -> None:
    """d2t must send the draft ids to distinct target ids, exactly those t2d marks."""
    targets = model.target_ids(torch.arange(model.config.draft_vocab_size))
    vocab = model.config.vocab_size
    if int(targets.min()) < 0 or int(targets.max()) >= vocab:
        raise ValueError(f"d2t sends draft ids outside the vocabulary of {vocab} (target id = draft id + d2t[id])")
    if targets.unique().numel() != targets.numel():
        raise ValueError("d2t sends two draft ids to the same target id")
    marked = torch.zeros(vocab, dtype=torch.bool)
    marked[targets] = True
    if not torch.equal(marked, model.t2d.bool().cpu()):
        raise ValueError("t2d does not mark exactly the target ids d2t maps to")


def vocabulary_maps(target_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft vocabulary `target_ids` (int64 [V_draft], ascending) as EAGLE-3's (d2t, t2d)."""
    target_ids = target_ids.sort().values
    d2t = target_ids - torch.arange(target_ids.numel())
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[target_ids] = True
    return d2t, t2d


def save(model: EagleDraft, path: str | Path, extra: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """Write `model` in its layout's format (EAGLE-3: SpecForge's) into directory `path`; `extra`
    goes into config.json under "treedec" (how it was trained)."""
    from safetensors.torch import save_file

    config = model.config
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {
        "architectures": [EAGLE3_ARCHITECTURE if config.kind == "eagle3" else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": config.hidden_act,
        "vocab_size": config.vocab_size,
        "torch_dtype": str(dtype or next(model.parameters()).dtype).removeprefix("torch."),
        **config.rope,
    }
    if config.kind == "eagle3":
        fields.update(draft_vocab_size=config.draft_vocab_size, target_hidden_size=config.target_hidden_size)
        if config.aux_layers is not None:
            fields["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(config.aux_layers)}
    if extra:
        fields["treedec"] = extra
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    save_file(state, str(directory / WEIGHTS_NAMES[0]))
    (directory / CONFIG_NAME).write_text(json.dumps(fields, indent=2) + "\n")
