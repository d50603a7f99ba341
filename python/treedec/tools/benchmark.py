"""End-to-end speed of HF generate, HF prompt lookup and treedec drafters on the same prompts.

Methods run back to back on each prompt (A B C A B C ...), so slow drifts of a shared machine
hit every method alike. Each treedec method keeps its own learned state (acceptance, step costs,
Token Recycling's table) across the prompts, as one process serving one method would: sharing
it let a method decode a prompt with the table the method before it had just filled from the
same prompt's output (auto after recycling: tau 2.12 against 1.54 on its own, see README). The
warm-up decodes a prompt of its own, not the first measured one. Figures are sums over prompts,
and a speedup is a method's tokens per second over HF's (for greedy, where every method emits the
same tokens, the ratio of times). Greedy: every treedec output is compared token for token with
HF greedy's. Sampling (`sampling=dict(temperature=...)`): each method samples with the same seed
per prompt; outputs differ from HF's by design (another random stream), so there is nothing to
compare token by token (tests/test_sampling.py checks the distribution).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .. import profiling
from ..auditing import first_difference, logit_gap
from ..patching import LearnedState, learned_state, patch, set_learned_state, unpatch
from .prompts import Prompt

HF_METHODS = {"hf": {}, "hf_pld": {"prompt_lookup_num_tokens": 10}}
TREEDEC_METHODS = {"none": None, "lookup": "lookup", "recycling": "recycling", "auto": "auto", "layerskip": "layerskip",
                   "medusa": "medusa", "hydra": "hydra", "eagle": "eagle"}
# Left out of default method lists: they need trained weights (shipped ones exist for the embedded
# model only; others pass --medusa-heads / --hydra-heads / --eagle-drafter), so they run when asked for.
OPT_IN_METHODS = ("medusa", "hydra", "eagle")
# Methods whose drafter runs the model (or heads) to draft: the report prints their drafting figures
MODEL_DRAFTING_METHODS = ("layerskip", "medusa", "hydra", "eagle")
ALL_METHODS = tuple(HF_METHODS) + tuple(TREEDEC_METHODS)
# Warms up (compiles, starts the cost curve, runs layerskip's search) on text that no measured set holds.
WARMUP_PROMPT = Prompt("warmup", "Name three colours of the rainbow and one thing that has each colour.")


@dataclass
class Run:
    method: str
    category: str
    question_id: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    steps: int  # decode steps: HF's after its prefill, or treedec's loop steps (last_stats["steps"])
    identical: bool
    first_diff: int | None = None  # first generated position that differs from HF greedy
    logit_gap: float | None = None  # HF's top-2 logit gap there: a near-tie means fp rounding, not a bug
    draft_seconds: float = 0.0  # the drafter's proposing time within `seconds`
    drafted: int = 0  # candidate tokens a model drafter proposed (before the sizer prunes)
    accepted: int = 0  # tokens accepted from them
    profile: dict | None = None  # the call's per-phase step times (profile=True; treedec methods)


@dataclass
class Report:
    methods: list[str]
    runs: list[Run] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    # what each treedec method learned during the run (its tree-size curve, layerskip's search);
    # not saved to JSON
    learned: dict[str, LearnedState] = field(default_factory=dict, repr=False)

    def summary(self, category: str | None = None) -> dict[str, dict]:
        rows = {}
        for method in self.methods:
            runs = [r for r in self.runs if r.method == method and (category is None or r.category == category)]
            hf = [r for r in self.runs if r.method == "hf" and (category is None or r.category == category)]
            seconds = sum(r.seconds for r in runs)
            tokens = sum(r.new_tokens for r in runs)
            hf_seconds = sum(r.seconds for r in hf)
            hf_rate = sum(r.new_tokens for r in hf) / hf_seconds if hf_seconds else 0.0
            steps = sum(r.steps for r in runs)
            forwards = steps + sum(r.new_tokens > 0 for r in runs)  # and each call's prefill, which emits a token
            rows[method] = {
                "prompts": len(runs),
                "tokens_per_s": tokens / seconds if seconds else 0.0,
                "speedup": (tokens / seconds) / hf_rate if seconds and hf_rate else float("nan"),
                "tau": tokens / forwards if forwards else float("nan"),
                "step_ms": 1000 * seconds / forwards if forwards else float("nan"),
                "identical": sum(r.identical for r in runs),
            }
        return rows

    def drafting(self, method: str) -> dict:
        """A model drafter's figures over all prompts: acceptance of its drafted tokens and the
        ratio of drafting time to the rest of decoding (verification, mostly)."""
        runs = [r for r in self.runs if r.method == method]
        draft = sum(r.draft_seconds for r in runs)
        rest = sum(r.seconds for r in runs) - draft
        drafted = sum(r.drafted for r in runs)
        return {
            "draft_seconds": draft,
            "draft_to_verify": draft / rest if rest > 0 else float("nan"),
            "drafted": drafted,
            "acceptance": sum(r.accepted for r in runs) / drafted if drafted else float("nan"),
        }

    def profile(self, method: str) -> dict | None:
        """A treedec method's per-phase step times summed over its prompts (None: not profiled)."""
        profiles = [r.profile for r in self.runs if r.method == method and r.profile]
        return profiling.merge(profiles) if profiles else None

    def profiles(self) -> dict[str, dict]:
        return {m: p for m in self.methods if (p := self.profile(m)) is not None}

    def categories(self) -> list[str]:
        seen: list[str] = []
        for run in self.runs:
            if run.category not in seen:
                seen.append(run.category)
        return seen

    def table(self) -> str:
        header = f"{'category':<15}" + "".join(f"{m:>22}" for m in self.methods)
        sub = f"{'':<15}" + "".join(f"{'tok/s  x   tau  same':>22}" for _ in self.methods)
        lines = [header, sub]
        for category in self.categories() + [None]:
            rows = self.summary(category)
            cells = []
            for m in self.methods:
                r = rows[m]
                tau = f"{r['tau']:.2f}" if m != "hf_pld" else "  - "
                # Sampling: treedec methods are checked against `none`; HF's samples against nothing.
                unchecked = self.meta.get("sampling") and (m in HF_METHODS or "none" not in self.methods)
                same = "  -  " if unchecked else f"{r['identical']:>2}/{r['prompts']:<2}"
                cells.append(f"{r['tokens_per_s']:6.1f} {r['speedup']:4.2f} {tau:>5} {same}")
            lines.append(f"{category or 'overall':<15}" + "".join(f"{c:>22}" for c in cells))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "meta": self.meta,
            "methods": self.methods,
            "summary": {c or "overall": self.summary(c) for c in self.categories() + [None]},
            "runs": [asdict(r) for r in self.runs],
            "drafting": {m: self.drafting(m) for m in self.methods if m in MODEL_DRAFTING_METHODS},
            "profile": self.profiles(),
        }


def encode_prompt(tokenizer, prompt: Prompt) -> dict:
    """One user turn through the tokenizer's chat template: input_ids and attention_mask [1, L],
    the prompt as the benchmark measures it (and as `train-heads` trains on it)."""
    messages = [{"role": "user", "content": prompt.text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _hf_logit_gap(model, inputs: dict, common: list[int]) -> float:
    """HF's top-2 logit gap after the prompt and `common`, from the unpatched model."""
    if hasattr(model, "treedec"):
        unpatch(model)
    return logit_gap(model, inputs["input_ids"], inputs.get("attention_mask"), common)[0]


def check_methods(model, methods: list[str], options: dict | None = None) -> None:
    """Patch `model` with each treedec method in `methods` (and its `options`) once and unpatch it:
    a bad option value, a layer index past the model or heads that do not fit it fail here, before
    anything is timed. The model leaves as it came."""
    outside = learned_state(model)
    try:
        for method in methods:
            if method in TREEDEC_METHODS:
                set_learned_state(model, LearnedState())  # a throwaway: building drafters fills tables
                patch(model, drafter=TREEDEC_METHODS[method], **(options or {}).get(method, {}))
    finally:
        if hasattr(model, "treedec"):
            unpatch(model)
        set_learned_state(model, outside)


def run_benchmark(
    model, tokenizer, prompts: list[Prompt], methods: list[str], max_new_tokens: int = 128,
    progress: bool = True, warmup: bool = True, sampling: dict | None = None, options: dict | None = None,
    profile: bool = False,
) -> Report:
    """Time HF and treedec generation per prompt on the model's own device (CUDA work is
    synchronised before each clock read, so the figures are wall-clock). `options` maps a treedec
    method to its `treedec.patch` options (e.g. {"layerskip": {"mode": "exit"}}). `profile`:
    every treedec call records where its steps' time goes (Report.profile; on a GPU the profile
    synchronises at every phase, which slows the treedec methods' timings)."""
    options = {m: dict(o) for m, o in (options or {}).items()}
    if profile:
        for method in methods:
            if method in TREEDEC_METHODS:
                options.setdefault(method, {})["profile"] = True
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    check_methods(model, methods, options)
    # HF is the reference for every other method; when sampling, `none` (if run) is the reference
    # for the other treedec methods: they sample with the same uniforms, so they must agree with it.
    methods = ["hf"] + [m for m in methods if m == "none"] + [m for m in methods if m not in ("hf", "none")]
    device = next(model.parameters()).device
    report = Report(methods, meta={
        "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype), "torch": torch.__version__, "device": _device_name(device),
        "sampling": sampling, "profile": profile,
    })
    decoding = dict(do_sample=True, **sampling) if sampling else dict(do_sample=False)

    report.learned = {m: LearnedState() for m in methods if m in TREEDEC_METHODS}
    outside = learned_state(model)  # what the model had learned before: given back at the end

    def generate(method: str, inputs: dict, new_tokens: int, seed: int = 0):
        if method in HF_METHODS:
            if hasattr(model, "treedec"):
                unpatch(model)
            kwargs = HF_METHODS[method]
        else:
            set_learned_state(model, report.learned[method])
            patch(model, drafter=TREEDEC_METHODS[method], **options.get(method, {}))
            kwargs = {}
        torch.manual_seed(seed)
        _synchronize(device)
        started = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, **decoding, **kwargs)
        _synchronize(device)
        seconds = time.perf_counter() - started
        new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
        # HF's first token comes from its prefill, as treedec's does: the steps are the forwards after it
        stats = model.treedec.last_stats if method in TREEDEC_METHODS else {"steps": max(new_tokens - 1, 0)}
        return out[0, inputs["input_ids"].shape[1]:].tolist(), seconds, stats

    try:
        if warmup and prompts:
            inputs = encode_prompt(tokenizer, WARMUP_PROMPT).to(device)
            for method in methods:
                generate(method, inputs, 8)
        for index, prompt in enumerate(tqdm(prompts, desc="prompts", disable=not progress)):
            inputs = encode_prompt(tokenizer, prompt).to(device)
            reference = sampled_reference = None
            for method in methods:
                tokens, seconds, stats = generate(method, inputs, max_new_tokens, seed=index)
                if method == "hf":
                    reference = tokens
                if method == "none":
                    sampled_reference = tokens
                if sampling:  # HF draws another random stream: compare treedec methods with `none`
                    diff, gap = None, None
                    identical = method in TREEDEC_METHODS and tokens == sampled_reference
                else:
                    diff = first_difference(tokens, reference)
                    gap = None if diff is None else _hf_logit_gap(model, inputs, reference[:diff])
                    identical = diff is None
                drafted = stats.get("drafted") or 0  # model drafters (layerskip, heads) report these
                acceptance = stats.get("draft_acceptance") or 0.0
                report.runs.append(Run(method, prompt.category, prompt.question_id,
                                       inputs["input_ids"].shape[1], len(tokens), seconds, stats["steps"],
                                       identical, diff, gap, stats.get("draft_seconds", 0.0), drafted,
                                       round(acceptance * drafted), stats.get("profile")))
            if progress:
                mine = report.runs[-len(methods):]
                hf_rate = mine[0].new_tokens / mine[0].seconds  # tokens/s: sampled lengths differ
                flag = (lambda r: "") if sampling else (lambda r: "" if r.identical else " DIFF")
                cells = "  ".join(f"{r.method} x{r.new_tokens / r.seconds / hf_rate:.2f}{flag(r)}"
                                  for r in mine[1:])
                tqdm.write(f"{prompt.category:<15} {mine[0].prompt_tokens:>5} tok prompt  {cells}")
    finally:  # the model leaves as it came: unpatched, with what it had learned
        if hasattr(model, "treedec"):
            unpatch(model)
        set_learned_state(model, outside)
    return report


def plot_speedups(report: Report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = report.categories() + [None]
    methods = [m for m in report.methods if m != "hf"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(8, len(categories) * 0.9), 4))
    for i, method in enumerate(methods):
        values = [report.summary(c)[method]["speedup"] for c in categories]
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(categories))])
    ax.set_xticklabels([c or "overall" for c in categories], rotation=35, ha="right")
    ax.set_ylabel("speedup over HF greedy")
    ax.legend(ncol=len(methods), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def profile_table(profiles: dict[str, dict]) -> str:
    """Milliseconds per step in each phase (columns), one row per label (a method, or a method at
    a batch size), with the measured step time: the phases sum to it."""
    header = f"{'':<16}" + "".join(f"{phase[:11]:>12}" for phase in profiling.PHASES) + f"{'step':>9}"
    lines = [header]
    for label, profile in profiles.items():
        per_step = profiling.per_step_ms(profile)
        lines.append(f"{label:<16}" + "".join(f"{per_step[p]:>12.2f}" for p in profiling.PHASES)
                     + f"{profiling.step_ms(profile):>9.2f}")
    return "\n".join(lines)


def plot_profile(profiles: dict[str, dict], path: str, title: str = "") -> None:
    """A stacked bar per label: milliseconds per step in each phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(profiles)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 3), 4))
    bottoms = [0.0] * len(labels)
    for phase in profiling.PHASES:
        values = [profiling.per_step_ms(profiles[label])[phase] for label in labels]
        ax.bar(labels, values, bottom=bottoms, label=phase)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("ms per step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_json(report: Report, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(report.to_json(), handle, indent=1)
