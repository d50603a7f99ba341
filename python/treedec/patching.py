"""patch / unpatch a Hugging Face causal LM, and load-time patching.

`patch` validates everything first, then switches the model's attention to "treedec" and
puts a `generate` on the instance; `unpatch` puts both back. What treedec cannot do yet falls
back to the original `generate` with a one-time warning naming the reason.
"""

from __future__ import annotations

import types
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from . import attention, compat, sampling, sizing
from .decoding import DecodeRequest, ModelRunner, TreeDecoder
from .drafters import Drafter, check_drafter_name, drafter_options, make_drafter
from .heads import HEAD_KINDS
from .heads.shipped import shipped_heads
from .prompts import eos_ids

compat.check_transformers_version()

# config.model_type -> what the loop needs from the model. All four call attention through
# transformers' AttentionInterface and keep layers at `model.<base_model_prefix>.layers`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LOOP_OPTIONS = ("max_tree_nodes", "acceptance", "posterior_threshold", "posterior_alpha", "cpu_linear")
ACCEPTANCE_RULES = ("exact", "typical")  # "typical": Medusa's typical acceptance, lossy, sampling only
DEFAULT_MAX_TREE_NODES = 32

# generate() arguments treedec handles itself; anything else falls back.
MODEL_KWARGS_HANDLED = ("attention_mask", "use_cache")


@dataclass
class LearnedState:
    """What treedec learns about a model while decoding; kept across calls and re-patching."""

    acceptance: sizing.AcceptanceModel = field(default_factory=sizing.AcceptanceModel)
    cost: sizing.CostCurve = field(default_factory=sizing.CostCurve)
    # Sampling accepts a draft with the target's probability, not when it is the argmax, and its
    # step also computes full logits: it learns its own acceptance rates and step costs.
    sample_acceptance: sizing.AcceptanceModel = field(default_factory=sizing.AcceptanceModel)
    sample_cost: sizing.CostCurve = field(default_factory=sizing.CostCurve)
    tables: dict = field(default_factory=dict)  # drafter tables (Token Recycling's successor table)


_LEARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> LearnedState


@dataclass
class TreedecState:
    """Everything treedec keeps on a patched model (`model.treedec`)."""

    drafter: str | Drafter | None
    options: dict
    original_attn_implementation: str
    original_generate: object
    runner: ModelRunner
    learned: LearnedState
    last_stats: dict = field(default_factory=dict)
    warned: set = field(default_factory=set)


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"treedec does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no LM head; patch a *ForCausalLM model")


def _allowed_options(drafter) -> set[str]:
    if isinstance(drafter, Drafter):  # a ready drafter instance: only the loop's options apply
        return set(LOOP_OPTIONS)
    check_drafter_name(drafter)
    return set(drafter_options(drafter)) | set(LOOP_OPTIONS)


def _check_options(drafter, options: dict) -> dict:
    allowed = _allowed_options(drafter)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for drafter={drafter!r}; allowed: {', '.join(sorted(allowed))}"
        )
    max_nodes = options.get("max_tree_nodes", DEFAULT_MAX_TREE_NODES)
    if not isinstance(max_nodes, int) or not 1 <= max_nodes <= max(sizing.TREE_SIZES):
        raise ValueError(f"max_tree_nodes = {max_nodes!r} must be an int in [1, {max(sizing.TREE_SIZES)}]")
    if not isinstance(options.get("cpu_linear", True), bool):
        raise ValueError(f"cpu_linear = {options['cpu_linear']!r} must be True or False")
    rule = options.get("acceptance", "exact")
    if rule not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance = {rule!r} must be one of {', '.join(map(repr, ACCEPTANCE_RULES))}")
    for name, low, high in (("posterior_threshold", 0.0, 1.0), ("posterior_alpha", 0.0, float("inf"))):
        if name in options:
            value = options[name]
            if rule != "typical":
                raise ValueError(f"{name} applies to acceptance='typical' only")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low < value <= high:
                raise ValueError(f"{name} = {value!r} must be a number in ({low}, {high}]")
    return dict(options)


def patch(model, drafter: str | None = "auto", **options):
    """Patch `model` in place for tree decoding and return it. See README for drafters and options."""
    _check_model(model)
    options = _check_options(drafter, options)
    if drafter in HEAD_KINDS and options.get("heads") is None:  # the shipped heads, where they fit
        options["heads"] = shipped_heads(drafter, model.config)
    learned = _LEARNED.get(model) or LearnedState()
    # Building the drafter once here surfaces bad option values before anything changes.
    _drafter_for(drafter, options, model.config.vocab_size, learned)
    runner = ModelRunner(model, compat.cache_kwarg_name(getattr(model, model.base_model_prefix)))
    if hasattr(model, "treedec"):  # re-patching: start from the original model
        unpatch(model)

    attention.register()
    original = model.config._attn_implementation
    model.set_attn_implementation(attention.ATTN_NAME)
    _LEARNED[model] = learned
    model.treedec = TreedecState(drafter, options, original, model.generate, runner, learned)
    model.generate = types.MethodType(_generate, model)
    return model


def learned_tables(model) -> dict:
    """What drafters learned about `model` across calls and patches (recycling's table, the
    layer-skip search's result), kept while the model lives."""
    learned = _LEARNED.get(model)
    return learned.tables if learned is not None else {}


def learned_state(model) -> LearnedState | None:
    """Everything treedec learned about `model` (acceptance, step costs, drafter tables), or None."""
    return _LEARNED.get(model)


def set_learned_state(model, state: LearnedState | None) -> None:
    """Make `state` everything treedec has learned about `model`; None forgets it all, so the next
    call starts as in a fresh process (it calibrates again, and Token Recycling's table is empty).
    The benchmarks give each method its own state: one method must not decode a prompt with a
    table another method filled from the same prompt's output."""
    if state is None and not hasattr(model, "treedec"):
        _LEARNED.pop(model, None)
        return
    state = state or LearnedState()  # a patched model holds one
    _LEARNED[model] = state
    if hasattr(model, "treedec"):
        model.treedec.learned = state


def _drafter_for(drafter, options: dict, vocab_size: int, learned: LearnedState) -> Drafter:
    if isinstance(drafter, Drafter):
        return drafter
    return make_drafter(drafter, options, vocab_size, learned.tables)


def unpatch(model):
    """Undo `patch`: the original attention implementation and `generate` come back."""
    state = getattr(model, "treedec", None)
    if state is None:
        raise ValueError("model is not patched by treedec")
    model.set_attn_implementation(state.original_attn_implementation)
    del model.__dict__["generate"]
    del model.__dict__["treedec"]
    return model


class AutoModelForCausalLM:
    """`transformers.AutoModelForCausalLM` that patches at load time."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path, *args, drafter: str | None = "auto", **kwargs):
        from transformers import AutoModelForCausalLM as HFAuto

        allowed = _allowed_options(drafter)
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in allowed}
        _check_options(drafter, options)
        model = HFAuto.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return patch(model, drafter=drafter, **options)


# -- generate ----------------------------------------------------------------------------------
def _fallback_reason(config, model_config, kwargs: dict, extra: dict, batch: int, total_len: int) -> str | None:
    """Why this call cannot go through treedec, or None."""
    if config.do_sample and sampling.unsupported_reason(config):
        return sampling.unsupported_reason(config)
    if (config.num_beams or 1) > 1:
        return "beam search (num_beams > 1)"
    if (config.num_return_sequences or 1) > 1:
        return "num_return_sequences > 1"
    if getattr(config, "prompt_lookup_num_tokens", None) or extra.get("assistant_model") is not None:
        return "HF's own assisted generation / prompt lookup was requested"
    for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states",
                 "return_dict_in_generate"):
        if getattr(config, name, False):
            return f"{name}=True (treedec returns token ids only)"
    processors = {
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
    }
    for name, active in processors.items():
        if active(getattr(config, name, None)):
            return f"{name} is set (logits processors and stop strings are not applied to trees yet)"
    for name in ("logits_processor", "prefix_allowed_tokens_fn", "negative_prompt_ids"):
        if extra.get(name):
            return f"{name} was passed"
    if extra.get("streamer") is not None and batch > 1:
        return "a streamer with batch size > 1 (treedec's sequences advance by different amounts)"
    window = getattr(model_config, "sliding_window", None)
    if window is not None and getattr(model_config, "use_sliding_window", True) and total_len > window:
        return f"prompt + max_new_tokens ({total_len}) exceeds the sliding window ({window})"
    unknown = sorted(k for k, v in kwargs.items() if k not in MODEL_KWARGS_HANDLED and v is not None)
    if unknown:
        return f"unsupported generate argument(s) {', '.join(unknown)}"
    return None


def _validate_ids(input_ids, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        kind = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor of token ids; got {kind}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, length>0]")
    if attention_mask is None:
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(input_ids.shape)}")
    mask = attention_mask.bool().cpu()
    # Left padding only: once a row's mask turns on, it stays on.
    right_padded = (mask[:, :-1] & ~mask[:, 1:]).any(1)
    if bool(right_padded.any()):
        row = int(right_padded.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {row} has padding after real tokens; treedec needs left padding "
            "(tokenizer.padding_side = 'left')"
        )
    if not bool(mask[:, -1].all()):
        row = int((~mask[:, -1]).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has no real tokens")


def _generate(model, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
              prefix_allowed_tokens_fn=None, streamer=None, **kwargs):
    state: TreedecState = model.treedec
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    config = compat.resolve_generation_config(model, generation_config)
    model_kwargs = config.update(**kwargs)  # what is not a generation setting is a model input
    assistant_model = model_kwargs.pop("assistant_model", None)
    extra = dict(logits_processor=logits_processor, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                 streamer=streamer, assistant_model=assistant_model,
                 negative_prompt_ids=model_kwargs.pop("negative_prompt_ids", None))
    batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 1
    reason = None if input_ids is not None else "no input_ids (inputs_embeds is not supported)"
    length = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() else 0
    total_len = length + (config.max_new_tokens or 0)
    reason = reason or _fallback_reason(config, model.config, model_kwargs, extra, batch, total_len)
    if reason is not None:
        if reason not in state.warned:
            state.warned.add(reason)
            warnings.warn(f"treedec: falling back to transformers' generate: {reason}", stacklevel=2)
        state.last_stats = {}
        return state.original_generate(inputs, generation_config=generation_config, logits_processor=logits_processor,
                                       stopping_criteria=stopping_criteria,
                                       prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, streamer=streamer,
                                       **({"input_ids": input_ids} if inputs is None and input_ids is not None else {}),
                                       **kwargs)

    attention_mask = model_kwargs.get("attention_mask")
    _validate_ids(input_ids, attention_mask)
    options, learned = state.options, state.learned
    request = _request(model, config, input_ids, attention_mask, stopping_criteria, streamer, options)
    drafter = _drafter_for(state.drafter, options, model.config.vocab_size, learned)
    if request.sampler is not None:
        acceptance, cost = learned.sample_acceptance, learned.sample_cost
    else:
        acceptance, cost = learned.acceptance, learned.cost
    max_nodes = options.get("max_tree_nodes", DEFAULT_MAX_TREE_NODES)
    decoder = TreeDecoder(state.runner, drafter, acceptance, cost, max_nodes, cpu_linear=options.get("cpu_linear", True))
    output, stats = decoder.generate(request)
    state.last_stats = {**stats.as_dict(), **drafter.report()}
    return output.to(input_ids.device)


def _sampler(config, options: dict) -> sampling.Sampler:
    typical = None
    if options.get("acceptance", "exact") == "typical":
        typical = sampling.TypicalAcceptance(**{k: float(options[k]) for k in ("posterior_threshold", "posterior_alpha")
                                                if k in options})
    return sampling.Sampler(sampling.build_warpers(config), top_k=config.top_k or None, typical=typical)


def _request(model, config, input_ids, attention_mask, stopping_criteria, streamer, options: dict) -> DecodeRequest:
    length = input_ids.shape[1]
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
    else:
        max_new = (config.max_length or 20) - length
    if not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"max_new_tokens = {max_new!r} must be an int >= 1 (prompt length {length})")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab}); got [{int(input_ids.min())}, {int(input_ids.max())}]")
    real_len = int(attention_mask.sum(1).max()) if attention_mask is not None else length
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and real_len + max_new > limit:
        raise ValueError(
            f"prompt ({real_len} tokens) + max_new_tokens ({max_new}) exceeds the model's "
            f"max_position_embeddings ({limit})"
        )
    eos = config.eos_token_id
    pad = config.pad_token_id
    if pad is None:  # HF pads finished rows with the first EOS id when no pad id is set
        pad = eos if isinstance(eos, int) else (list(eos)[0] if eos else 0)
    return DecodeRequest(
        input_ids=input_ids.long(),
        attention_mask=attention_mask,
        max_new_tokens=max_new,
        eos_token_ids=eos_ids(config),
        pad_token_id=int(pad),
        stopping_criteria=list(stopping_criteria or []),
        streamer=streamer,
        sampler=_sampler(config, options) if config.do_sample else None,
    )
