"""patch / unpatch a Hugging Face causal LM, and load-time patching.

`patch` validates everything first, then switches the model's attention to "treedec" and
puts a `generate` on the instance; `unpatch` puts both back. What treedec cannot do yet falls
back to the original `generate` with a one-time warning naming the reason.
"""

from __future__ import annotations

import contextlib
import types
import warnings
import weakref
from dataclasses import dataclass, field


from . import attention, compat, generation, layers, sizing
from .adapters import SUPPORTED_MODEL_TYPES, ModelAdapter, adapter_for, text_config
from .decoding import TreeDecoder
from .drafters import DRAFTERS, Drafter, check_drafter_name, drafter_options, make_drafter
from .generation import GenerateCall
from .heads import HEAD_KINDS
from .heads.modules import CONFIG_NAME
from .eagle.checkpoint import CONFIG_NAME as EAGLE_CONFIG_NAME
from .eagle.shipped import SHIPPED_DIR as SHIPPED_EAGLE
from .eagle.shipped import shipped_drafter
from .heads.shipped import SHIPPED_DIR, shipped_heads
from .options import bool_option, int_option, number_option

compat.check_transformers_version()

LOOP_OPTIONS = ("max_tree_nodes", "acceptance", "posterior_threshold", "posterior_alpha", "cpu_linear", "profile")
ACCEPTANCE_RULES = ("exact", "typical")  # "typical": Medusa's typical acceptance, lossy, sampling only
DEFAULT_MAX_TREE_NODES = 32


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
    # per row count, whether the few-row kernel or torch's linear runs the projections (layers.py)
    linear_routing: layers.LinearRouting = field(default_factory=layers.LinearRouting)
    # per drafter, greedy or sampling, and batch size: whether steps draft at all (drafted steps
    # that lose to plain ones stop a while); what drafting costs depends on the drafter
    gates: dict = field(default_factory=dict)

    def gate(self, drafter, sampling: bool) -> sizing.DraftGate:
        name = drafter if isinstance(drafter, str) or drafter is None else type(drafter).__name__
        return self.gates.setdefault((name, sampling), sizing.DraftGate())


_LEARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> LearnedState


@dataclass
class TreedecState:
    """Everything treedec keeps on a patched model (`model.treedec`)."""

    drafter: str | Drafter | None
    options: dict
    original_attn_implementation: str
    original_generate: object
    adapter: ModelAdapter
    learned: LearnedState
    last_stats: dict = field(default_factory=dict)
    warned: set = field(default_factory=set)


def _check_model(model) -> None:
    if getattr(getattr(model, "config", None), "model_type", None) not in SUPPORTED_MODEL_TYPES:
        adapter_for(model)  # the error naming the supported types
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no LM head; patch a *ForCausalLM model")
    on_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    # accelerate's offloading keeps weights on the meta device and loads them in its hooks: such a
    # model generates (through HF, see generation.model_reason); without hooks nothing ever loads them
    if on_meta and not any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise ValueError(f"{len(on_meta)} parameters of the model ({on_meta[0]}, ...) are on the meta device and "
                         "no accelerate hook loads them: load the weights before patching")


def _allowed_options(drafter) -> set[str]:
    if isinstance(drafter, Drafter):  # a ready drafter instance: only the loop's options apply
        return set(LOOP_OPTIONS)
    check_drafter_name(drafter)
    return set(drafter_options(drafter)) | set(LOOP_OPTIONS)


def _unknown_options_error(drafter, unknown) -> ValueError:
    allowed = ", ".join(sorted(_allowed_options(drafter)))
    return ValueError(f"unknown option(s) {', '.join(sorted(unknown))} for drafter={drafter!r}; allowed: {allowed}")


def check_options(drafter, options: dict) -> dict:
    """The options with their values checked (numpy ints as ints); a ValueError naming the first
    bad one. Drafter options are checked by building the drafter (see patch)."""
    unknown = set(options) - _allowed_options(drafter)
    if unknown:
        raise _unknown_options_error(drafter, unknown)
    options = dict(options)
    if "max_tree_nodes" in options:
        options["max_tree_nodes"] = int_option("max_tree_nodes", options["max_tree_nodes"], 1, max(sizing.TREE_SIZES))
    for name in ("cpu_linear", "profile"):
        if name in options:
            bool_option(name, options[name])
    rule = options.get("acceptance", "exact")
    if rule not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance = {rule!r} must be one of {', '.join(map(repr, ACCEPTANCE_RULES))}")
    for name, high in (("posterior_threshold", 1.0), ("posterior_alpha", float("inf"))):
        if name in options:
            if rule != "typical":
                raise ValueError(f"{name} applies to acceptance='typical' only")
            options[name] = number_option(name, options[name], 0.0, high, low_open=True)
    return options


def check_options_before_loading(drafter, options: dict) -> dict:
    """Everything `patch` checks that needs no model: option names, the loop's values, and the
    drafter's own values (by building it over a one-token vocabulary; a heads drafter with the
    shipped heads when none are given). from_pretrained and the CLI call it before anything loads."""
    options = check_options(drafter, options)
    if isinstance(drafter, Drafter):
        return options
    built_with = options
    if drafter in HEAD_KINDS and options.get("heads") is None:  # without heads=, only the shipped ones
        if not (SHIPPED_DIR / drafter / CONFIG_NAME).exists():
            return options
        built_with = {**options, "heads": SHIPPED_DIR / drafter}
    if drafter == "eagle" and options.get("drafter_path") is None:  # likewise the shipped drafter
        if not (SHIPPED_EAGLE / EAGLE_CONFIG_NAME).exists():
            return options
        built_with = {**options, "drafter_path": SHIPPED_EAGLE}
    make_drafter(drafter, built_with, 1, {})
    return options


# Every option some drafter or the loop takes: a name among these passed to from_pretrained is
# meant for treedec (perhaps for another drafter), never for transformers.
ALL_OPTIONS = frozenset(LOOP_OPTIONS).union(*(drafter_options(name) for name in DRAFTERS))


def patch(model, drafter: str | None = "auto", **options):
    """Patch `model` in place for tree decoding and return it. See README for drafters and options."""
    _check_model(model)
    options = check_options(drafter, options)
    if drafter in HEAD_KINDS and options.get("heads") is None:  # the shipped heads, where they fit
        options["heads"] = shipped_heads(drafter, model)
    if drafter == "eagle" and options.get("drafter_path") is None:  # the shipped drafter, where it fits
        options["drafter_path"] = shipped_drafter(model)
    learned = _LEARNED.get(model) or LearnedState()
    # Building the drafter once here surfaces bad option values before anything changes.
    _drafter_for(drafter, options, model.config, learned)
    adapter = adapter_for(model)
    if hasattr(model, "treedec"):  # re-patching: start from the original model
        unpatch(model)

    attention.register()
    original = model.config._attn_implementation
    model.set_attn_implementation(attention.ATTN_NAME)
    _LEARNED[model] = learned
    model.treedec = TreedecState(drafter, options, original, model.generate, adapter, learned)
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
    call starts as in a fresh process (its cost curve is measured again, and Token Recycling's table is empty).
    The benchmarks give each method its own state: one method must not decode a prompt with a
    table another method filled from the same prompt's output."""
    if state is None and not hasattr(model, "treedec"):
        _LEARNED.pop(model, None)
        return
    state = state or LearnedState()  # a patched model holds one
    _LEARNED[model] = state
    if hasattr(model, "treedec"):
        model.treedec.learned = state


def _drafter_for(drafter, options: dict, model_config, learned: LearnedState) -> Drafter:
    if isinstance(drafter, Drafter):
        return drafter
    model_config = text_config(model_config)
    return make_drafter(drafter, options, model_config.vocab_size, learned.tables, model_config.num_hidden_layers)


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
        """Load with transformers (every other argument is its), then `patch(model, drafter,
        **options)`. treedec's options are checked before anything loads, with patch's message."""
        from transformers import AutoModelForCausalLM as HFAuto

        allowed = _allowed_options(drafter)
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in allowed}
        misplaced = [k for k in kwargs if k in ALL_OPTIONS]  # another drafter's option
        if misplaced:
            raise _unknown_options_error(drafter, misplaced)
        check_options_before_loading(drafter, options)
        try:
            model = HFAuto.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except TypeError as error:  # a name neither treedec nor transformers takes (a typo)
            rejected = [k for k in kwargs if f"'{k}'" in str(error)]
            if rejected:
                raise _unknown_options_error(drafter, rejected) from error
            raise
        return patch(model, drafter=drafter, **options)


# -- generate ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _original_attention(model, state: TreedecState):
    """Within the block the model attends with its own implementation again (eager, sdpa, ...):
    "treedec" outside the loop is sdpa, whose rounding differs from eager's."""
    if state.original_attn_implementation == attention.ATTN_NAME:
        yield
        return
    model.set_attn_implementation(state.original_attn_implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(attention.ATTN_NAME)



def _generate(model, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
              prefix_allowed_tokens_fn=None, synced_gpus=None, assistant_model=None, streamer=None,
              negative_prompt_ids=None, negative_prompt_attention_mask=None, custom_generate=None, **kwargs):
    """HF's `generate` signature. The call is read as HF reads it (generation.prepare); what
    treedec cannot decode exactly as HF would goes to HF's own generate, with a one-time warning."""
    state: TreedecState = model.treedec
    call = GenerateCall(inputs, generation_config, logits_processor, stopping_criteria, prefix_allowed_tokens_fn,
                        synced_gpus, assistant_model, streamer, negative_prompt_ids, negative_prompt_attention_mask,
                        custom_generate, kwargs)
    options, learned = state.options, state.learned
    max_nodes = options.get("max_tree_nodes", DEFAULT_MAX_TREE_NODES)
    drafter_name = state.drafter if not isinstance(state.drafter, Drafter) else None
    state.adapter.refresh()  # the LM head may have been replaced or hooked since patch
    request = generation.prepare(model, state.adapter, call, drafter_name, options, max_nodes)
    if isinstance(request, str):
        if request not in state.warned:
            state.warned.add(request)
            warnings.warn(f"treedec: falling back to transformers' generate: {request}", stacklevel=2)
        state.last_stats = {}
        with _original_attention(model, state):  # HF's generate as unpatched, eager attention included
            return state.original_generate(**call.hf_arguments())

    drafter = _drafter_for(state.drafter, options, model.config, learned)
    if request.sampler is not None:
        acceptance, cost = learned.sample_acceptance, learned.sample_cost
    else:
        acceptance, cost = learned.acceptance, learned.cost
    gate = learned.gate(state.drafter, request.sampler is not None)
    decoder = TreeDecoder(state.adapter, drafter, acceptance, cost, max_nodes, cpu_linear=options.get("cpu_linear", True),
                          profile=options.get("profile", False), routing=learned.linear_routing, gate=gate)
    output, stats = decoder.generate(request)
    state.last_stats = {**stats.as_dict(), **drafter.report()}
    return output.to(request.input_ids.device)
