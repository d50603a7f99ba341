"""`treedec bench e2e` as it ran before 2026-11-28, to measure that benchmark defect on today's code.

    python bench/e2e_shared_state.py --limit-per-category 1 \
        --max-new-tokens 128 --methods hf none recycling auto --json OUT.json

Then every method shared one learned state on the model (so Token Recycling's table, filled by one
method on a prompt, was read by the next method on the same prompt) and the warm-up decoded the
first measured prompt. This script switches the benchmark's per-method state off, warms up on the
first prompt, and passes its arguments to `treedec bench e2e`. README ("A benchmark defect,
fixed") compares it with the isolated runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and bench/kernels.py would then
# stand in for the `kernels` package that transformers imports when it is installed: drop it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from treedec.tools import benchmark, cli  # noqa: E402


def main(argv: list[str]) -> int:
    isolated_run, set_state = benchmark.run_benchmark, benchmark.set_learned_state
    warmup = benchmark.WARMUP_PROMPT

    def shared_run(model, tokenizer, prompts, *args, **kwargs):
        benchmark.WARMUP_PROMPT = prompts[0]
        return isolated_run(model, tokenizer, prompts, *args, **kwargs)

    benchmark.set_learned_state = lambda model, state: None  # one state for every method, kept on the model
    benchmark.run_benchmark = shared_run
    try:
        return cli.main(["bench", "e2e", *argv])
    finally:
        benchmark.run_benchmark, benchmark.set_learned_state = isolated_run, set_state
        benchmark.WARMUP_PROMPT = warmup


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
