"""The generate front: a `generate` call read as HF's generate reads it, then decoded by treedec
or handed back to HF.

HF's own helpers resolve the call (wrapped in compat.py): the GenerationConfig's precedence and
validation, the default of 20 new tokens, the special tokens (ints, lists, numpy ints, tensors),
the attention mask inferred from pad tokens. So a call means to treedec what it means to HF, and a
bad setting gets HF's own error. `prepare` returns a DecodeRequest, or the reason treedec cannot
decode the call exactly as HF would; the caller then runs HF's generate with the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import compat, sampling
from .adapters import ModelAdapter
from .decoding import DecodeRequest

# generate() model inputs treedec handles itself; any other one falls back.
MODEL_KWARGS_HANDLED = ("attention_mask", "use_cache")
# rope types whose frequencies follow the longest position in a forward: a tree reaches positions
# before HF's one-token steps do, so past this length the two would rotate differently
LENGTH_DEPENDENT_ROPE = {"dynamic": "max_position_embeddings", "longrope": "original_max_position_embeddings"}
# generation settings that need HF's logits processors or stopping rules; treedec applies none
PROCESSOR_SETTINGS = {
    "repetition_penalty": lambda v: v is not None and v != 1.0,
    "no_repeat_ngram_size": lambda v: bool(v),
    "encoder_no_repeat_ngram_size": lambda v: bool(v),
    "bad_words_ids": lambda v: v is not None,
    "min_length": lambda v: bool(v),
    "min_new_tokens": lambda v: bool(v),
    "forced_bos_token_id": lambda v: v is not None,
    "forced_eos_token_id": lambda v: v is not None,
    "suppress_tokens": lambda v: v is not None,
    "begin_suppress_tokens": lambda v: v is not None,
    "sequence_bias": lambda v: v is not None,
    "exponential_decay_length_penalty": lambda v: v is not None,
    "guidance_scale": lambda v: v is not None and v != 1.0,
    "watermarking_config": lambda v: v is not None,
    "stop_strings": lambda v: v is not None,
    "max_time": lambda v: v is not None,
    "token_healing": lambda v: bool(v),
}
# the generation modes treedec decodes; every other one (contrastive search, DoLa, constrained,
# beam and assisted decoding) is HF's
HANDLED_MODES = ("greedy_search", "sample")


@dataclass
class GenerateCall:
    """One call's arguments, under the names of HF's `generate` signature."""

    inputs: torch.Tensor | None = None
    generation_config: object = None
    logits_processor: object = None
    stopping_criteria: object = None
    prefix_allowed_tokens_fn: object = None
    synced_gpus: bool | None = None
    assistant_model: object = None
    streamer: object = None
    negative_prompt_ids: torch.Tensor | None = None
    negative_prompt_attention_mask: torch.Tensor | None = None
    custom_generate: object = None
    kwargs: dict = field(default_factory=dict)

    def hf_arguments(self) -> dict:
        """The call as keyword arguments of HF's generate (those left at None omitted)."""
        named = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "kwargs"}
        return {**{k: v for k, v in named.items() if v is not None}, **self.kwargs}


def prepare(model, adapter: ModelAdapter, call: GenerateCall, drafter_name, options: dict,
            max_tree_nodes: int) -> DecodeRequest | str:
    """The call as a DecodeRequest, or why treedec cannot decode it (a reason for the warning).
    Raises HF's errors for bad settings, and a ValueError for token ids no model can read."""
    reason = _call_reason(call) or model_reason(model, adapter, drafter_name)
    if reason is not None:
        return reason
    kwargs = dict(call.kwargs)
    input_ids = call.inputs if call.inputs is not None else kwargs.pop("input_ids", None)
    has_default_max, has_default_min = compat.has_default_lengths(model, call.generation_config, kwargs)
    config, model_kwargs = compat.prepare_generation_config(model, call.generation_config, kwargs)
    reason = config_reason(config, model_kwargs, call.assistant_model)
    if reason is not None:
        return reason
    if input_ids is None:
        return "no input_ids (inputs_embeds, or a prompt of BOS alone)"
    check_input_ids(input_ids, adapter.vocab_size)
    batch, length = input_ids.shape
    if call.streamer is not None and batch > 1:
        return "a streamer with batch size > 1 (treedec's sequences advance by different amounts)"
    attention_mask = model_kwargs.get("attention_mask")
    compat.prepare_special_tokens(model, config, attention_mask is not None, input_ids.device, batch)
    if attention_mask is None:
        attention_mask = compat.infer_attention_mask(model, input_ids, config)
    reason = padding_reason(attention_mask, input_ids.shape)
    if reason is not None:
        return reason
    eos = config._eos_token_tensor
    eos_token_ids = frozenset() if eos is None else frozenset(int(e) for e in eos.view(-1).tolist())
    pad = config._pad_token_tensor
    criteria = list(call.stopping_criteria or [])
    # HF pads a row once it stops only where some criterion stops at EOS; otherwise a row that a
    # criterion stopped keeps generating until the whole batch stops
    finished_rows_pad = bool(eos_token_ids) or any(hasattr(c, "eos_token_id") for c in criteria)
    if finished_rows_pad and pad is None:
        return "a stopping criterion with an eos_token_id, and no pad or EOS token id to pad with"
    compat.prepare_generated_length(model, config, has_default_max, has_default_min, input_ids)
    max_new_tokens, eos_token_ids = _custom_limits(criteria, length, config.max_length - length, eos_token_ids)
    real_length = int(attention_mask.sum(1).max())
    reason = length_reason(adapter.config, real_length + max_new_tokens + max_tree_nodes)
    if reason is not None:
        return reason
    compat.validate_generated_length(model, config, length, has_default_max)
    return DecodeRequest(
        input_ids=input_ids.long(),
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        pad_token_id=0 if pad is None else int(pad),
        stopping_criteria=criteria,
        finished_rows_pad=finished_rows_pad,
        streamer=call.streamer,
        sampler=_sampler(config, options) if config.do_sample else None,
    )


def _custom_limits(criteria: list, length: int, max_new_tokens: int, eos_token_ids: frozenset[int]):
    """(max_new_tokens, eos_token_ids) once the caller's criteria of HF's own kinds take the place
    of HF's: a MaxLengthCriteria or EosTokenCriteria passed in replaces the one the settings
    build (HF's `_merge_criteria_processor_list`), so its length or ids rule, longer ones too."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    lengths = [c.max_length for c in criteria if type(c) is MaxLengthCriteria]
    if lengths:  # HF always takes one step before its first check
        max_new_tokens = max(1, min(lengths) - length)
    eos_lists = [c.eos_token_id.view(-1).tolist() for c in criteria if type(c) is EosTokenCriteria]
    if eos_lists:
        eos_token_ids = frozenset(int(e) for ids in eos_lists for e in ids)
    return max_new_tokens, eos_token_ids


def _call_reason(call: GenerateCall) -> str | None:
    for name in ("custom_generate", "prefix_allowed_tokens_fn", "negative_prompt_ids",
                 "negative_prompt_attention_mask", "assistant_model"):
        if getattr(call, name) is not None:
            return f"{name} was passed"
    if call.synced_gpus:
        return "synced_gpus=True"
    if call.logits_processor:
        return "logits_processor was passed"
    return None


def model_reason(model, adapter: ModelAdapter, drafter_name) -> str | None:
    """Why treedec cannot decode on `model` as it stands now (hooks or offloading added since
    `patch`), or None."""
    for module in adapter.bypassed:
        if module._forward_hooks or module._forward_pre_hooks:
            return f"forward hooks on the {type(module).__name__} (treedec's loop never calls its forward)"
    if adapter.stack._forward_hooks or adapter.stack._forward_pre_hooks:
        if drafter_name == "layerskip":  # its steps run the decoder layers without the stack's forward
            return f"forward hooks on {type(adapter.stack).__name__} with drafter='layerskip'"
    if drafter_name in ("medusa", "hydra") and adapter.lm_head_weight is None:
        head = type(adapter.lm_head).__name__
        return (f"drafter={drafter_name!r} drafts through the LM head's [V, H] weight; {head} has none resident and "
                "whole (none at all, offloaded by accelerate, or sharded across ranks)")
    return None


def config_reason(config, model_kwargs: dict, assistant_model=None) -> str | None:
    """Why treedec cannot decode with these generation settings, or None."""
    if config.do_sample and sampling.unsupported_reason(config):
        return sampling.unsupported_reason(config)
    if (config.num_beams or 1) > 1:
        return "beam search (num_beams > 1)"
    mode = config.get_generation_mode(assistant_model).value  # HF's own reading of the settings
    if mode not in HANDLED_MODES:
        return f"the generation mode is {mode}"
    if (config.num_return_sequences or 1) > 1:
        return "num_return_sequences > 1"
    if getattr(config, "prompt_lookup_num_tokens", None):
        return "HF's own assisted generation / prompt lookup was requested"
    if config.cache_implementation == "paged":
        return "continuous batching (cache_implementation='paged')"
    for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states",
                 "return_dict_in_generate"):
        if getattr(config, name, False):
            return f"{name}=True (treedec returns token ids only)"
    for name, active in PROCESSOR_SETTINGS.items():
        if active(getattr(config, name, None)):
            return f"{name} is set (logits processors and stop strings are not applied to trees yet)"
    unknown = sorted(k for k, v in model_kwargs.items() if k not in MODEL_KWARGS_HANDLED and v is not None)
    if unknown:
        return f"unsupported generate argument(s) {', '.join(unknown)}"
    return None


def padding_reason(attention_mask: torch.Tensor, shape: torch.Size) -> str | None:
    """Why this mask is not a left-padded batch treedec decodes, or None (HF then decodes it)."""
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(shape)}")
    mask = attention_mask.bool().cpu()
    right_padded = (mask[:, :-1] & ~mask[:, 1:]).any(1)  # a row's mask turns off after it turned on
    if bool(right_padded.any()):
        row = int(right_padded.nonzero()[0, 0])
        return (f"attention_mask row {row} has padding after real tokens; treedec decodes left-padded batches "
                "(tokenizer.padding_side = 'left')")
    if not bool(mask[:, -1].all()):
        return f"attention_mask row {int((~mask[:, -1]).nonzero()[0, 0])} has no real tokens"
    return None


def length_reason(model_config, longest: int) -> str | None:
    """Why a call reaching `longest` positions (prompt, new tokens and the deepest tree) is not
    rotated as HF would, or None.

    Ordinary rotations treat every position alike, so only rope types whose frequencies change
    with the forward's longest position matter; past that length HF's own output is the only
    reference there is. (Sliding windows need nothing here: tree attention applies each layer's
    window, `attention.layer_window`.)"""
    rope = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    limit_name = LENGTH_DEPENDENT_ROPE.get(rope_type)
    if limit_name is None:
        return None
    limit = rope.get(limit_name) or getattr(model_config, limit_name, None)
    if limit is not None and longest > limit:
        return f"rope_type {rope_type!r} past {limit_name} ({limit}): its frequencies change with the length"
    return None


def check_input_ids(input_ids, vocab_size: int) -> None:
    """A ValueError unless input_ids is an integer tensor [batch, length > 0] of ids in the vocabulary."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        kind = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor of token ids; got {kind}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, length>0]")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}); got [{low}, {high}]")


def _sampler(config, options: dict) -> sampling.Sampler:
    typical = None
    if options.get("acceptance", "exact") == "typical":
        typical = sampling.TypicalAcceptance(**{k: float(options[k]) for k in ("posterior_threshold", "posterior_alpha")
                                                if k in options})
    return sampling.Sampler(sampling.build_warpers(config), top_k=config.top_k or None, typical=typical)
