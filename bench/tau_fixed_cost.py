"""Drafters' tau on the embedded model with the verify cost fixed, so timing noise cannot move it.

    python bench/tau_fixed_cost.py
        [--methods auto medusa hydra] [--limit-per-category 1] [--max-new-tokens 128] [--threads 2]
        [--heads-options '{"draft_vocab": 8192}'] [--drafter-options '{"recycling_width": 8}']
        [--fixed-nodes 64] [--warmup-per-category 3] [--json OUT]

`treedec bench e2e` reports tau too, but there the sizer prices each tree from step times measured
in the same run, and on a shared 2-core CPU those move by 20% between runs: the same code gave
Medusa a tau of 1.85 in one run and 2.21 in the next. Here every method sizes its trees against
one fixed curve (COST_MS: seconds of a T-node verify at batch 1, measured on this CPU by an
e2e run), so a change to a drafter's proposals or keys is compared on what it drafts alone. The
output is deterministic; it is not a speed figure (tokens per second still need the e2e run).
Greedy, one generate call per prompt, each method with its own learned state (so recycling's
table carries over from prompt to prompt, as it does for a user).

With `--fixed-nodes N` sizing is off (`FlatCost`): each step verifies the largest tree the
drafter proposes, up to N nodes (the largest of sizing.TREE_SIZES within its trie):
tau then measures what the drafter drafts at that size, apart from the sizer's choices.
"""

from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and bench/kernels.py would then
# stand in for the `kernels` package that transformers imports when it is installed: drop it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import treedec  # noqa: E402
from treedec import sizing
from treedec.drafters import auto, lookup, recycling
from treedec.tools.benchmark import encode_prompt
from treedec.tools.models import load_default_model
from treedec.patching import LearnedState, set_learned_state
from treedec.tools.prompts import SPEC_BENCH_DEV, load_questions

# T -> ms of a T-node verify at batch 1: SmolLM2-135M, fp32, 2 threads on this CPU (the curve an
# e2e run printed, made non-decreasing); linear between the points (CostCurve.cost).
COST_MS = {1: 60, 2: 60, 3: 60, 4: 70, 5: 73, 6: 78, 8: 80, 10: 80, 12: 80, 16: 100, 20: 116, 24: 129,
           32: 154, 40: 179, 48: 204, 64: 255}


DRAFTER_OPTIONS = {"lookup": lookup.OPTIONS, "recycling": recycling.OPTIONS, "auto": auto.OPTIONS}


class FlatCost(sizing.CostCurve):
    """Sizing off: `choose` keeps the largest tree, up to max_tree_nodes. A flat cost would not
    do: a larger size must beat the best smaller one by SIZE_MARGIN in expected tokens, which
    nodes the acceptance model rates low do not add. Priced at 1 / T, every larger tree size
    wins by its ratio to the smaller one (at least 64 / 48)."""

    def __init__(self, max_nodes: int):
        super().__init__()
        self.max_nodes = max_nodes

    def cost(self, batch_size: int, num_nodes: int) -> float:
        return 1.0 / num_nodes

    def explored_nodes(self, batch_size: int) -> int:
        return self.max_nodes

    def record(self, batch_size: int, num_nodes: int, seconds: float) -> None:
        pass


class FixedCost(sizing.CostCurve):
    """COST_MS by work (batch size x T), priced as CostCurve prices its measured points; ignores
    the step times the loop records."""

    def __init__(self):
        super().__init__()
        self.seconds = {work: ms / 1e3 for work, ms in COST_MS.items()}

    def record(self, batch_size: int, num_nodes: int, seconds: float) -> None:
        pass


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", default=str(SPEC_BENCH_DEV),
                        help="Spec-Bench question.jsonl (default: the dev half shipped with treedec)")
    parser.add_argument("--methods", nargs="+", default=["auto", "medusa", "hydra"],
                        choices=["lookup", "recycling", "auto", "medusa", "hydra"])
    parser.add_argument("--limit-per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads-options", type=json.loads, default={},
                        help="JSON options for medusa and hydra, e.g. '{\"draft_vocab\": 8192}'")
    parser.add_argument("--drafter-options", type=json.loads, default={},
                        help="JSON options for lookup, recycling and auto (those each takes)")
    parser.add_argument("--fixed-nodes", type=int, default=None,
                        help="sizing off: every step verifies the drafter's tree up to this many nodes")
    parser.add_argument("--warmup-per-category", type=int, default=0,
                        help="first decode this many other prompts per category, unmeasured (a warm "
                             "recycling table, as a user's later calls have)")
    parser.add_argument("--json", default=None, help="write tau overall and per category here")
    args = parser.parse_args()
    if args.max_new_tokens < 1 or args.limit_per_category < 1 or args.warmup_per_category < 0:
        parser.error("--max-new-tokens and --limit-per-category must be at least 1, --warmup-per-category >= 0")
    if args.fixed_nodes is not None and not 2 <= args.fixed_nodes <= max(sizing.TREE_SIZES):
        parser.error(f"--fixed-nodes must be in [2, {max(sizing.TREE_SIZES)}]")
    torch.set_num_threads(args.threads)
    questions = load_questions(args.questions, args.limit_per_category + args.warmup_per_category)
    prompts, warmup = split_per_category(questions, args.limit_per_category)
    model, tokenizer = load_default_model()
    results = {}
    for method in args.methods:
        # nothing measured: every size priced from COST_MS, or all alike with --fixed-nodes
        cost = FixedCost() if args.fixed_nodes is None else FlatCost(args.fixed_nodes)
        set_learned_state(model, LearnedState(cost=cost))
        treedec.patch(model, drafter=method, **method_options(method, args))
        steps = tokens = nodes = 0
        seconds_drafting = 0.0
        per_prompt = []
        per_category: dict[str, list[int]] = {}  # category -> [tokens, steps]
        started = time.perf_counter()
        for prompt in warmup:  # not measured: what the drafter's tables learn carries on
            model.generate(**encode_prompt(tokenizer, prompt), max_new_tokens=args.max_new_tokens, do_sample=False)
        for prompt in prompts:
            inputs = encode_prompt(tokenizer, prompt)
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            new = out.shape[1] - inputs["input_ids"].shape[1]
            steps += model.treedec.last_stats["steps"]
            nodes += model.treedec.last_stats["mean_tree_nodes"] * model.treedec.last_stats["steps"]
            seconds_drafting += model.treedec.last_stats["draft_seconds"]
            tokens += new
            per_prompt.append(f"{new / model.treedec.last_stats['steps']:.2f}")
            counts = per_category.setdefault(prompt.category, [0, 0])
            counts[0] += new
            counts[1] += model.treedec.last_stats["steps"]
        treedec.unpatch(model)
        results[method] = {"tau": tokens / steps, "mean_tree_nodes": nodes / steps,
                           "per_category": {c: t / s for c, (t, s) in per_category.items()}}
        seconds = time.perf_counter() - started
        print(f"{method:<10} tau {tokens / steps:.3f}, {nodes / steps:.1f} nodes a tree, over {len(prompts)} "
              f"prompts ({seconds:.0f} s, of which "
              f"{seconds_drafting:.1f} s drafting); per prompt {' '.join(per_prompt)}", flush=True)
        print("           by category: " + ", ".join(f"{c} {t / s:.2f}" for c, (t, s) in per_category.items()),
              flush=True)
    set_learned_state(model, None)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "fixed_nodes": args.fixed_nodes,
                                               "limit_per_category": args.limit_per_category,
                                               "warmup_per_category": args.warmup_per_category,
                                               "max_new_tokens": args.max_new_tokens, "results": results}, indent=1))
    return results


def split_per_category(questions, measured: int):
    """(the first `measured` questions of each category, the rest), each in the file's order."""
    seen: dict[str, int] = {}
    first, rest = [], []
    for question in questions:
        seen[question.category] = seen.get(question.category, 0) + 1
        (first if seen[question.category] <= measured else rest).append(question)
    return first, rest


def method_options(method: str, args) -> dict:
    """The options a method takes from --heads-options / --drafter-options; with --fixed-nodes,
    the loop's max_tree_nodes (recycling's default template, 160 paths, more than fills it)."""
    if method in ("medusa", "hydra"):
        options = dict(args.heads_options)
    else:
        spec = DRAFTER_OPTIONS[method]
        options = {k: v for k, v in args.drafter_options.items() if k in spec}
    if args.fixed_nodes is not None:
        options["max_tree_nodes"] = args.fixed_nodes
    return options


if __name__ == "__main__":
    main()
