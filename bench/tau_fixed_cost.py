"""Drafters' tau on the embedded model with the verify cost fixed, so timing noise cannot move it.

    python bench/tau_fixed_cost.py
        [--methods auto medusa hydra] [--limit-per-category 1] [--max-new-tokens 128] [--threads 2]
        [--heads-options '{"draft_vocab": 8192}']

`treedec bench e2e` reports tau too, but there the sizer prices each tree from step times measured
in the same run, and on a shared 2-core CPU those move by 20% between runs: the same code gave
Medusa a tau of 1.85 in one run and 2.21 in the next. Here every method sizes its trees against
one fixed curve (COST_MS: seconds of a T-node verify at batch 1, measured on this CPU by an
e2e run), so a change to a drafter's proposals or keys is compared on what it drafts alone. The
output is deterministic; it is not a speed figure (tokens per second still need the e2e run).
Greedy, one generate call per prompt, each method with its own learned state.
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
from treedec.tools.benchmark import encode_prompt
from treedec.tools.models import load_default_model
from treedec.patching import LearnedState, set_learned_state
from treedec.tools.prompts import SPEC_BENCH_DEV, load_questions

# T -> ms of a T-node verify at batch 1: SmolLM2-135M, fp32, 2 threads on this CPU (the curve an
# e2e run printed, made non-decreasing); linear between the points (CostCurve.cost).
COST_MS = {1: 60, 2: 60, 3: 60, 4: 70, 5: 73, 6: 78, 8: 80, 10: 80, 12: 80, 16: 100, 20: 116, 24: 129,
           32: 154, 40: 179, 48: 204, 64: 255}


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
    args = parser.parse_args()
    if args.max_new_tokens < 1 or args.limit_per_category < 1:
        parser.error("--max-new-tokens and --limit-per-category must be at least 1")
    torch.set_num_threads(args.threads)
    prompts = load_questions(args.questions, args.limit_per_category)
    model, tokenizer = load_default_model()
    results = {}
    for method in args.methods:
        set_learned_state(model, LearnedState(cost=FixedCost()))  # nothing measured: every size priced from COST_MS
        treedec.patch(model, drafter=method, **(args.heads_options if method in ("medusa", "hydra") else {}))
        steps = tokens = 0
        seconds_drafting = 0.0
        per_prompt = []
        started = time.perf_counter()
        for prompt in prompts:
            inputs = encode_prompt(tokenizer, prompt)
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            new = out.shape[1] - inputs["input_ids"].shape[1]
            steps += model.treedec.last_stats["steps"]
            seconds_drafting += model.treedec.last_stats["draft_seconds"]
            tokens += new
            per_prompt.append(f"{new / model.treedec.last_stats['steps']:.2f}")
        treedec.unpatch(model)
        results[method] = tokens / steps
        seconds = time.perf_counter() - started
        print(f"{method:<10} tau {tokens / steps:.3f} over {len(prompts)} prompts ({seconds:.0f} s, of which "
              f"{seconds_drafting:.1f} s drafting); per prompt {' '.join(per_prompt)}", flush=True)
    set_learned_state(model, None)
    return results


if __name__ == "__main__":
    main()
